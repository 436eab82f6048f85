"""A base's own chat template (templates.py, chatml.render_template) against transformers:

- three template styles (Qwen2.5's ChatML with a default system turn, Llama 3's headers with a
  bos token and <|eot_id|>, Gemma's, which folds the system prompt into the first user turn):
  jaxsft's ids equal apply_chat_template(..., tokenize=True) on single- and multi-turn
  conversations with and without a system turn, and its loss mask equals transformers'
  assistant mask on the same template with {% generation %} tags around answer + end of turn;
- stops: the base's generation_config eos ids and the template's end of turn;
- training data: a Llama-format base with a template trains on the template's ids, its
  vocabulary not grown (data.chat_template=chatml: today's markers);
- the shared prefix (packing, the engine) is one every rendered row starts with;
- bad input: one line naming the template (or the row), exit 2, nothing written;
- end to end (slow): a template run answers, inspects and exports without its base (transformers'
  greedy answers through an export's template equal bin/chat's: test_families, for each family).

Every tokenizer and model is built here; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, lazy_import, one_line_error, run_main

transformers = lazy_import("transformers")  # at first use (conftest.TOGETHER)

from jaxsft import chatml, hf, templates  # noqa: E402
from jaxsft.data import read_jsonl, row_texts  # noqa: E402

# Qwen2.5-Instruct's template without its tools branch (the rest as it is)
QWEN = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""
QWEN_MASKED = QWEN.replace(
    """        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}""",
    """        {%- if message.role == 'assistant' %}
            {{- '<|im_start|>assistant\\n' }}{% generation %}{{ message.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
        {%- endif %}""")

# Meta-Llama-3-8B-Instruct's template, as it is
LLAMA3 = (r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = """
          r"""'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + """
          r"""'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"""
          r"""{{ content }}{% endfor %}{% if add_generation_prompt %}"""
          r"""{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}""")
LLAMA3_MASKED = (r"""{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"""
                 r"""{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"""
                 r"""{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"""
                 r"""{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"""
                 r"""{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}""")

# Gemma's (as gemma-2/3 instruct write it): the system prompt goes into the first user turn
GEMMA = (r"""{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = """
         r"""messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}"""
         r"""{% set first_user_prefix = "" %}{% set loop_messages = messages %}{% endif %}"""
         r"""{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"""
         r"""{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}{% endif %}"""
         r"""{% if (message['role'] == 'assistant') %}{% set role = "model" %}{% else %}"""
         r"""{% set role = message['role'] %}{% endif %}"""
         r"""{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}"""
         r"""{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"""
         r"""{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}""")
GEMMA_MASKED = GEMMA.replace(r"""{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}""",
                             r"""{% if role == 'model' %}{% generation %}{{ message['content'] | trim }}"""
                             r"""{{ '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}{% else %}"""
                             r"""{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endif %}""")

SPECIAL = ["<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<bos>", "<eos>", "<start_of_turn>",
           "<end_of_turn>"]
# name -> (template, with generation tags, tokenizer_config's tokens, eos ids of generation_config.json)
STYLES = {
    "qwen": (QWEN, QWEN_MASKED, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_end|>",
                                                                                            "<|endoftext|>"]),
    "llama3": (LLAMA3, LLAMA3_MASKED, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               ["<|end_of_text|>", "<|eot_id|>"]),
    "gemma": (GEMMA, GEMMA_MASKED, {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, ["<eos>"]),
}
# the end of turn each style's template writes after an answer
END_OF_TURN = {"qwen": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}

SYSTEM = ("system", "你是数学老师。Answer briefly.")
CONVERSATIONS = [
    [("user", "1+1等于几？")],
    [SYSTEM, ("user", "1+1等于几？")],
    [("user", "你好"), ("assistant", "你好！有什么可以帮你？")],
    [SYSTEM, ("user", "37小于82，对吗？"), ("assistant", "对。")],
    [("user", "你好"), ("assistant", "你好！ "), ("user", "什么是过拟合？"),
     ("assistant", "模型记住了训练数据的噪声。")],
    [SYSTEM, ("user", "Hi there"), ("assistant", " Hello, friend."), ("user", "2*3=?"), ("assistant", "6")],
    [("user", "什么是过拟合？"), ("assistant", "记住噪声。"), ("user", "怎么避免？")],
]


def bpe_backend():
    """A small byte-level BPE trained on data/ text, with every style's special tokens."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL + ["<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = row_texts(read_jsonl(os.path.join(REPO, "data", "train.jsonl"))[:1500])
    backend.train_from_iterator(texts + ["Hi there Hello friend Answer briefly"], trainer)
    return backend


@pytest.fixture(scope="module")
def backend():
    return bpe_backend()


def write_base_files(path, backend, style, template=None, jinja_file=False, generation=True):
    """A base's tokenizer files and a config.json (the weights are not read by these tests)."""
    source, _, tokens, eos = STYLES[style]
    os.makedirs(path, exist_ok=True)
    backend.save(os.path.join(path, "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    if jinja_file:
        with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(template or source)
    else:
        tc["chat_template"] = template or source
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tc, f, ensure_ascii=False)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "vocab_size": backend.get_vocab_size()}, f)
    if generation:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [backend.token_to_id(t) for t in eos]}, f)
    return str(path)


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request, backend, tmp_path_factory):
    """(name, jaxsft's tokenizer, transformers' tokenizer) of a base with that style's template."""
    path = write_base_files(tmp_path_factory.mktemp(request.param), backend, request.param,
                            jinja_file=request.param == "gemma")  # (chat_template.jinja: read as transformers does)
    tok = hf.read_tokenizer(path, backend.get_vocab_size())
    return request.param, tok, transformers.PreTrainedTokenizerFast.from_pretrained(path)


def dicts(conv):
    return [{"role": r, "content": c} for r, c in conv]


def test_prompt_ids_equal_apply_chat_template(style):
    """What bin/chat, bin/eval and bin/serve prompt with (Generator.prompt_ids, the format's default
    system prompt) is transformers' add_generation_prompt=True."""
    from jaxsft.config import ModelConfig
    from jaxsft.decode import Generator
    name, tok, hf_tok = style
    gen = Generator(None, ModelConfig(vocab_size=len(tok), max_seq_len=512, d_model=32, n_heads=2, n_layers=1,
                                      d_ff=64), tok)
    for conv in CONVERSATIONS:
        if conv[-1][0] == "assistant":
            conv = conv[:-1]
        ids, truncated = gen.prompt_ids(conv)
        theirs = hf_tok.apply_chat_template(dicts(conv), add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids.tolist() == list(theirs) and not truncated, (name, conv)
        assert not chatml.render(conv, tok, "", add_generation_prompt=True)[1].any()


def test_loss_mask_equals_transformers_assistant_mask(style):
    """Training rows: the ids of the whole conversation, and the mask on the answers and their
    end of turn, as transformers marks the {% generation %} spans."""
    name, tok, hf_tok = style
    masked = STYLES[name][1]
    eot = tok.backend.token_to_id(END_OF_TURN[name])
    for conv in CONVERSATIONS:
        if conv[-1][0] != "assistant":
            continue
        ids, mask = chatml.render(conv, tok, "")
        out = hf_tok.apply_chat_template(dicts(conv), tokenize=True, return_dict=True)
        assert ids.tolist() == list(out["input_ids"]), (name, conv)
        tagged = hf_tok.apply_chat_template(dicts(conv), chat_template=masked, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        assert list(tagged["input_ids"]) == ids.tolist()  # the tagged template renders the same text,
        tagged_t = dataclasses.replace(tok.template, source=masked)  # in jaxsft's environment too
        assert templates.render_text(tagged_t, dicts(conv), False) == templates.render_text(tok.template, dicts(conv),
                                                                                             False)
        assert mask.tolist() == list(tagged["assistant_masks"]), (name, conv)
        # every answer's end of turn is learned, nothing else of the template
        answers = sum(r == "assistant" for r, _ in conv)
        assert int(mask[ids == eot].sum()) == answers
        assert tok.decode(ids[mask > 0], skip_special=False).count(END_OF_TURN[name]) == answers


def test_stops_are_the_eos_ids_and_the_end_of_turn(style):
    name, tok, _ = style
    eos = [tok.backend.token_to_id(t) for t in STYLES[name][3]]
    eot = tok.backend.token_to_id(END_OF_TURN[name])
    assert tok.stop_ids == tuple(dict.fromkeys(eos + [eot]))
    assert templates.end_of_turn(tok.template) == END_OF_TURN[name]
    # no ChatML marker was added: the vocabulary is the base's
    assert len(tok) == tok.backend.get_vocab_size() and tok.backend.token_to_id("<|assistant|>") is None
    assert tok.user_id is None and tok.end_id == tok.backend.token_to_id(STYLES[name][2]["eos_token"])


def test_system_prompt_default_is_the_templates_own(style):
    """A row without a system turn gets what the template does (Qwen: its default system turn,
    the others none), unless a system prompt is set: then it is the row's system turn."""
    name, tok, hf_tok = style
    conv = [("user", "你好")]
    assert chatml.default_system_prompt(tok, None) == ""
    ids, _ = chatml.render(conv, tok, chatml.default_system_prompt(tok, None), add_generation_prompt=True)
    text = tok.decode(ids, skip_special=False)
    assert ("You are Qwen" in text) == (name == "qwen")
    ids, _ = chatml.render(conv, tok, "Be brief.", add_generation_prompt=True)
    theirs = hf_tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *dicts(conv)],
                                        add_generation_prompt=True)["input_ids"]
    assert ids.tolist() == list(theirs)


def test_shared_prefix_is_what_every_row_starts_with(style):
    name, tok, _ = style
    for system in ("", "你是数学老师。"):
        prefix = chatml.system_prefix(tok, system)
        assert prefix is not None and len(prefix) > 0  # each style has a common start (bos or a system turn)
        for conv in CONVERSATIONS:
            if conv[0][0] == "system":
                continue
            ids, mask = chatml.render(conv, tok, system)
            assert ids[:len(prefix)].tolist() == prefix.tolist() and not mask[:len(prefix)].any(), (name, conv)


def test_template_rides_with_the_run_tokenizer(style, tmp_path):
    """The run's tokenizer.json keeps the template, its tokens, the stop ids and the base's
    generation_config, so the run renders alike once the base is gone."""
    from jaxsft.tokenizer import load
    name, tok, _ = style
    tok.save(str(tmp_path / "tokenizer.json"))
    back = load(str(tmp_path / "tokenizer.json"))
    assert back.template == tok.template and back.stop_ids == tok.stop_ids
    conv = CONVERSATIONS[4]
    assert all((a == b).all() for a, b in zip(chatml.render(conv, back, ""), chatml.render(conv, tok, "")))
    backend, config, special = hf._tokenizer_files(back, "", 128)
    assert config["chat_template"] == STYLES[name][0] and hf.generation_config(back) == tok.template.generation_config
    assert {k: config[k] for k in STYLES[name][2]} == STYLES[name][2]


def test_rewriting_or_changing_templates_are_refused(backend, tmp_path):
    # a template that changes answers (upper case): found by the probe, naming the template
    upper = QWEN.replace("message.content", "message.content | upper")
    src = write_base_files(tmp_path / "upper", backend, "qwen", template=upper)
    with pytest.raises(templates.TemplateError, match="tokenizer_config.json: chat_template: assistant turn 1's answer"):
        hf.read_tokenizer(src, backend.get_vocab_size())
    # a template that rewrites earlier turns: shows only the last answer
    rewrite = LLAMA3.replace("message['content'] | trim", "(message['content'] if loop.last or message['role'] != "
                                                            "'assistant' else '...') | trim")
    src = write_base_files(tmp_path / "rewrite", backend, "llama3", template=rewrite)
    tok = hf.read_tokenizer(src, backend.get_vocab_size())  # one answer: fine
    with pytest.raises(templates.TemplateError, match="rewrites earlier turns"):
        chatml.render(CONVERSATIONS[4], tok, "")
    # with no end of turn, a model could not learn to stop
    src = write_base_files(tmp_path / "open", backend, "qwen", template=QWEN.replace("+ '<|im_end|>' + '\\n' }}", "}}"))
    with pytest.raises(templates.TemplateError, match="nothing after the answer"):
        hf.read_tokenizer(src, backend.get_vocab_size())


def test_a_list_of_templates_uses_the_default_one(backend, tmp_path):
    src = write_base_files(tmp_path, backend, "qwen", template="x")
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('tools') }}"},
                           {"name": "default", "template": QWEN}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    assert hf.read_tokenizer(src, backend.get_vocab_size()).template.source == QWEN


def test_the_server_answers_400_when_the_template_refuses_the_messages(backend, tmp_path):
    """A request the base's template raises on (here Gemma 1's: no system role) is the client's
    mistake, named in an OpenAI-style 400, not a server error."""
    from jaxsft.serve.protocol import ApiError, parse_chat
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    tok = hf.read_tokenizer(write_base_files(tmp_path, backend, "gemma", template=no_system + GEMMA),
                            backend.get_vocab_size())
    body = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "你好"}]}
    with pytest.raises(ApiError) as e:
        parse_chat(body, tok, 256, "")
    assert e.value.status == 400 and "System role not supported" in str(e.value) and str(tmp_path) not in str(e.value)
    assert parse_chat({"messages": body["messages"][1:]}, tok, 256, "").prompt[0] == tok.bos_id


# ---------------------------------------------------------------- a Llama-format base: training, bad input


def build_base(path, backend, style="qwen", template=None):
    """A tiny LlamaForCausalLM built by transformers with a chat template: a downloaded model's
    directory (Qwen's: no bos token, eos ids <|im_end|> and <|endoftext|>)."""
    torch = pytest.importorskip("torch")
    write_base_files(path, backend, style, template, generation=False)
    eos = [backend.token_to_id(t) for t in STYLES[style][3]]
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos,
        pad_token_id=backend.token_to_id("<|endoftext|>"), initializer_range=0.1))
    m.save_pretrained(str(path))  # config.json, model.safetensors, generation_config.json (its eos ids)
    return str(path)


@pytest.fixture(scope="module")
def base(backend, tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("qwen_base"), backend)


YAML = """\
model:
  max_seq_len: 256
  dropout: 0.0
  init_from: {base}
data:
  train: {train}
  val: {val}
  test: null
train:
  batch_size: 4
  lr: 3.0e-3
  warmup_steps: 2
  max_steps: {steps}
  seed: 0
  sample_questions: 0
  pack_len: 256
  buckets: [128, 256]
out_dir: {out}
"""


def write_run_config(d, base, steps=2, rows=None):
    d = str(d)
    os.makedirs(d, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows] if rows else None
    with open(os.path.join(REPO, "data", "train.jsonl"), encoding="utf-8") as f:
        lines = lines or [f.readline() for _ in range(16)]
    for name in ("train.jsonl", "val.jsonl"):
        with open(os.path.join(d, name), "w", encoding="utf-8") as f:
            f.writelines(lines)
    path = os.path.join(d, "run.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(YAML.format(base=json.dumps(base), train=json.dumps(os.path.join(d, "train.jsonl")),
                            val=json.dumps(os.path.join(d, "val.jsonl")), steps=steps,
                            out=json.dumps(os.path.join(d, "run"))))
    return path


def test_training_rows_carry_the_templates_ids(base, tmp_path):
    """setup.prepare on a base with a template: examples are the template's ids and mask, the
    vocabulary is the base's (no new rows), the system prompt resolves to none of ours, and the
    shared prefix is the Qwen template's default system turn."""
    from jaxsft import parallel, setup
    from jaxsft.config import load_config
    cfg = load_config(write_run_config(tmp_path, base))
    s = setup.prepare(cfg, parallel.one_device_mesh(), log=lambda *a, **k: None)
    tok = s.tok
    assert tok.template is not None and (s.cfg.data.system_prompt, s.cfg.data.chat_template) == ("", "base")
    assert len(tok) == s.cfg.model.vocab_size == tok.backend.get_vocab_size()  # not grown
    rows = read_jsonl(cfg.data.train)
    for row, (inputs, targets, loss_mask) in zip(rows, s.train_examples):
        ids, mask = chatml.render(row.messages, tok, "")
        assert inputs.tolist() == ids[:-1].tolist() and loss_mask.tolist() == mask[1:].tolist()
        text = tok.decode(ids, skip_special=False)
        system = row.messages[0][1] if row.messages[0][0] == "system" else "You are Qwen"  # the template's default
        assert text.startswith("<|im_start|>system\n" + system) and "<|user|>" not in text
        answers = "".join(c + "<|im_end|>" for r, c in row.messages if r == "assistant")
        assert tok.decode(targets[loss_mask > 0], skip_special=False) == answers
    # packing shares the template's own system turn (every row starts with it)
    prefix = s.plan.main.prefix
    assert tok.decode(prefix, skip_special=False).startswith("<|im_start|>system\nYou are Qwen")
    assert all(x[:len(prefix)].tolist() == prefix.tolist() for (x, _, _), r in zip(s.train_examples, rows)
               if r.messages[0][0] != "system")
    # data.chat_template=chatml: today's behaviour, the markers the base lacks added
    chat = setup.tokenizer_for(load_config(write_run_config(tmp_path, base), ["data.chat_template=chatml"]), [])
    assert chat.template is None and len(chat) > len(tok) and chat.user_id >= len(tok)  # a new, untrained row


def _train_fails(tmp_path, base, capsys, monkeypatch, *sets, rows=None):
    """(exit status, stderr without bin/train's note on the Llama-format base it read)."""
    config = write_run_config(tmp_path, base, rows=rows)
    args = ["--config", config, "--no-progress"] + [a for s in sets for a in ("--set", s)]
    code, _, err = run_main("train", args, capsys, monkeypatch)
    assert not os.path.exists(tmp_path / "run")
    return code, "\n".join(line for line in err.splitlines() if not line.startswith("model.init_from: Llama-format"))


def test_bad_templates_and_keys_are_one_line_exit_2_nothing_written(backend, base, tmp_path, capsys, monkeypatch):
    # a template that raises on a row (Gemma 1's on a system turn): the row's file and line, the template
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    gemma = build_base(tmp_path / "gemma", backend, "gemma", template=no_system + GEMMA)
    rows = [{"instruction": "你好", "response": "你好！"}] * 3 + [
        {"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]}]
    code, err = _train_fails(tmp_path / "raises", gemma, capsys, monkeypatch, rows=rows)
    one_line_error(code, err, f"{tmp_path / 'raises' / 'train.jsonl'}:4: ", f"{gemma}/tokenizer_config.json: "
                   "chat_template: TemplateError: System role not supported")
    # a template whose answers cannot be found
    shutil.copytree(base, tmp_path / "upper")
    tc_path = tmp_path / "upper" / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["chat_template"] = QWEN.replace("message.content", "message.content | upper")
    tc_path.write_text(json.dumps(tc))
    code, err = _train_fails(tmp_path / "upper_run", str(tmp_path / "upper"), capsys, monkeypatch)
    one_line_error(code, err, f"{tc_path}: chat_template: assistant turn 1's answer is not in the text")
    # an unknown data.chat_template
    code, err = _train_fails(tmp_path / "unknown", base, capsys, monkeypatch, "data.chat_template=qwen")
    one_line_error(code, err, "--set data.chat_template: expected base or chatml, got 'qwen'")
    # base, where the base has none
    os.remove(tmp_path / "upper" / "tokenizer_config.json")
    code, err = _train_fails(tmp_path / "none", str(tmp_path / "upper"), capsys, monkeypatch, "data.chat_template=base")
    one_line_error(code, err, "data.chat_template: base, but", "has no chat template")


# ---------------------------------------------------------------- end to end


def hf_answers(out, convs, max_new_tokens):
    """transformers' greedy answers, one prompt at a time, through the export's chat template."""
    import torch
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    answers = []
    for conv in convs:
        ids = hf_tok.apply_chat_template(dicts(conv), add_generation_prompt=True)["input_ids"]
        gen = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)
        answers.append(hf_tok.decode(gen[0, len(ids):], skip_special_tokens=True))
    return answers


@pytest.mark.slow
def test_a_template_run_answers_inspects_and_exports_without_its_base(base, tmp_path, capsys, monkeypatch):
    """bin/train on a base with its own template; then, with the base moved away, bin/chat answers as
    it did beside it, bin/inspect's table shows the template's tokens, and bin/export writes the base's
    template and generation_config.json. (transformers' answers through an export's template equal
    bin/chat's: test_families' end-to-end test, for each family.) In this process: each program's
    own process is tested elsewhere."""
    config = write_run_config(tmp_path, base, steps=6)
    run = tmp_path / "run"
    code, _, err = run_main("train", ["--config", config, "--no-progress"], capsys, monkeypatch)
    assert code == 0 and "its own chat template" in err and "ChatML markers" not in err, err
    chat = ["--checkpoint", run, "1+1等于几？", "--max-new-tokens", 16]
    code, beside, err = run_main("chat", chat, capsys, monkeypatch)
    assert code == 0 and beside.strip(), err
    with open(os.path.join(base, "tokenizer_config.json")) as f, open(os.path.join(base, "generation_config.json")) as g:
        template, generation = json.load(f)["chat_template"], json.load(g)
    shutil.move(base, str(base) + ".gone")
    try:
        code, out, err = run_main("inspect", ["--config", config, "--checkpoint", run], capsys, monkeypatch)
        assert code == 0 and "<|im_start|>" in out and "<|user|>" not in out, err
        code, alone, err = run_main("chat", chat, capsys, monkeypatch)
        assert code == 0 and alone == beside, err
        code, _, err = run_main("export", ["--checkpoint", run, "--out", tmp_path / "exported"], capsys, monkeypatch)
        assert code == 0, err
        assert json.load(open(tmp_path / "exported" / "tokenizer_config.json"))["chat_template"] == template
        assert json.load(open(tmp_path / "exported" / "generation_config.json")) == generation
    finally:
        shutil.move(str(base) + ".gone", base)
