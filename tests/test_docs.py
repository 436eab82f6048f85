"""The docs cannot drift from the code: every config field is documented where it is
declared, every `module.name`, config key, repository path and `--set key=` the docs
name exists, and every place that states the default run's duration states the same range.

A failure names file:line and the reference, e.g.
    docs/user-guide.md:113: `chatml.typical_rows` does not resolve
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import inspect
import os
import pkgutil
import re
import textwrap

import jaxsft
from jaxsft import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "bench/README.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
CONFIG_CLASSES = (config.ModelConfig, config.DataConfig, config.TrainConfig, config.MeshConfig,
                  config.LoraConfig, config.Config)

# how long the default run (configs/default.yaml: 3,100 steps, training then answering
# data/test.jsonl) takes on 2 CPU cores, from the fastest machine measured (bfloat16 products) to
# the slowest (float32, 134 GFLOP/s; scaled from its 2,400-step time)
DEFAULT_RUN = "6 to 20 minutes"
# the places that state it: (file, a text that starts the line or paragraph)
DEFAULT_RUN_PLACES = [
    ("README.md", "# install, train on data/"),
    ("README.md", "What the default run reaches"),
    ("configs/default.yaml", "# What the README runs"),
    ("configs/default.yaml", "  max_steps: 3100"),
]

DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
# a repository path: a top-level directory of this repository, then a file or folder in it
PATH = re.compile(r"(?<![\w./-])((?:bin|configs|data|docs|bench|jaxsft|scripts|tests|\.ci)/[\w./*-]*)")
SET_KEY = re.compile(r"--set\s+([\w.]+)=")
FROM_IMPORT = re.compile(r"^\s*from\s+(jaxsft[\w.]*)\s+import\s+([\w, ]+)")
# a name with one of these endings is a file name (model.safetensors, config.json), not a reference
FILE_ENDINGS = {"json", "jsonl", "png", "safetensors", "py", "yaml", "yml", "txt", "md", "html", "sh",
                "toml", "csv", "log", "pt", "bin", "parquet", "arrow"}
PY_DIRS = ["jaxsft", "jaxsft/cli", "bench", "scripts", "tests", "data", "bin", "."]


def _modules() -> set[str]:
    """jaxsft's module names: config, model, ..., cli."""
    return {m.name for m in pkgutil.iter_modules(jaxsft.__path__)}


def _top_level_names() -> dict:
    """Classes and functions defined at the top of a jaxsft module -> that module's name
    (Generator -> jaxsft.decode); a name defined in two modules is left out."""
    where: dict = {}
    for path in glob.glob(os.path.join(REPO, "jaxsft", "**", "*.py"), recursive=True):
        mod = "jaxsft." + os.path.relpath(path, os.path.join(REPO, "jaxsft"))[:-3].replace(os.sep, ".")
        mod = mod.removesuffix(".__init__")
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                where[node.name] = None if node.name in where else mod
    return {k: v for k, v in where.items() if v}


def _instance_attributes(cls) -> set[str]:
    """The names a class's methods assign as `self.name = ...` (Engine.stats)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return set()
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def _resolve_in(obj, parts) -> bool:
    """Whether getattr(obj, parts[0]).parts[1]... exists, importing submodules on the way."""
    for p in parts:
        if hasattr(obj, p):
            obj = getattr(obj, p)
            continue
        if inspect.isclass(obj):  # an instance's attribute: the chain can be followed no further
            return p in _instance_attributes(obj)
        if not hasattr(obj, "__path__"):
            return False
        try:
            obj = importlib.import_module(f"{obj.__name__}.{p}")
        except ImportError:
            return False
    return True


def _is_config_key(parts) -> bool:
    if len(parts) != 2:
        return False
    section = config.SECTIONS.get(parts[0])
    return section is not None and parts[1] in {f.name for f in dataclasses.fields(section)}


def resolve(ref: str, modules: set, names: dict) -> bool | None:
    """True: `ref` names something that exists; False: it names ours and does not
    resolve; None: not ours (jax.jit, torch.optim.AdamW, x.T, a file name)."""
    parts = ref.split(".")
    if parts[-1] in FILE_ENDINGS:
        if parts[-1] != "py":
            return None
        return any(os.path.exists(os.path.join(REPO, d, ref)) for d in PY_DIRS)
    if parts[0] == "jaxsft":
        return _resolve_in(jaxsft, parts[1:])
    if _is_config_key(parts):
        return True
    if parts[0] in modules:
        return _resolve_in(importlib.import_module(f"jaxsft.{parts[0]}"), parts[1:])
    if parts[0] in config.SECTIONS:  # a config key that is not one, e.g. `train.no_such_key`
        return False
    if parts[0] in names:
        return _resolve_in(importlib.import_module(names[parts[0]]), parts)
    return None


def _path_exists(path: str) -> bool:
    path = path.rstrip(".,;:")
    return bool(glob.glob(os.path.join(REPO, path)))


def doc_lines(rel: str):
    """(line number, text, inside a fenced code block) for each line of a doc."""
    fenced = False
    for i, line in enumerate(open(os.path.join(REPO, rel), encoding="utf-8").read().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        yield i, line, fenced


def unresolved(rel: str, modules: set, names: dict) -> list[str]:
    """file:line messages for each reference of one doc that does not resolve."""
    bad = []
    for i, line, fenced in doc_lines(rel):
        refs = []
        if not fenced:
            for span in re.findall(r"`([^`]+)`", line):
                m = DOTTED.match(span)
                if m and resolve(m.group(0), modules, names) is False:
                    refs.append(m.group(0))
        for key in SET_KEY.findall(line):
            if key not in ("out_dir", "section.key") and not _is_config_key(key.split(".")):
                refs.append(f"--set {key}")
        m = FROM_IMPORT.match(line) if fenced else None
        if m:
            for name in (n.strip() for n in m.group(2).split(",")):
                if not _resolve_in(jaxsft, m.group(1).split(".")[1:] + [name]):
                    refs.append(f"from {m.group(1)} import {name}")
        refs += [p for p in PATH.findall(line) if not _path_exists(p)]
        bad += [f"{rel}:{i}: `{r}` does not resolve" for r in refs]
    return bad


def test_every_config_field_is_documented_where_it_is_declared():
    """A comment directly above each field, as in configs anyone reads in one glance."""
    path = os.path.join(REPO, "jaxsft", "config.py")
    lines = open(path, encoding="utf-8").read().splitlines()
    classes = {n.name: n for n in ast.parse("\n".join(lines)).body if isinstance(n, ast.ClassDef)}
    missing = []
    for cls in CONFIG_CLASSES:
        declared = {n.target.id: n.lineno for n in classes[cls.__name__].body if isinstance(n, ast.AnnAssign)}
        assert set(declared) == {f.name for f in dataclasses.fields(cls)}
        missing += [f"jaxsft/config.py:{ln}: {cls.__name__}.{name} has no comment above it"
                    for name, ln in declared.items() if not lines[ln - 2].strip().startswith("#")]
    assert not missing, "\n".join(missing)


def test_the_resolver_tells_ours_from_others():
    modules, names = _modules(), _top_level_names()
    ok = ["chatml.encode_rows", "jaxsft.decode.Generator.from_run", "model.init_from", "train.pack_len",
          "data.test", "lora.rank", "data.read_jsonl", "Generator.from_run", "cli.train", "lora.py",
          "Engine.stats"]
    bad = ["chatml.typical_rows", "chatml.answer_slots", "jaxsft.checkpoint.no_such", "train.no_such_key",
           "Generator.no_such", "Engine.no_such", "no_such_module.py"]
    others = ["jax.jit", "torch.optim.AdamW", "x.T", "model.safetensors", "config.json", "chat.completion.chunk"]
    assert [r for r in ok if resolve(r, modules, names) is not True] == []
    assert [r for r in bad if resolve(r, modules, names) is not False] == []
    assert [r for r in others if resolve(r, modules, names) is not None] == []


def test_every_reference_in_the_docs_resolves():
    modules, names = _modules(), _top_level_names()
    bad = [msg for rel in DOCS for msg in unresolved(rel, modules, names)]
    assert not bad, "\n".join(bad)


def test_the_default_runs_duration_is_the_same_everywhere():
    missing = []
    for rel, start in DEFAULT_RUN_PLACES:
        lines = open(os.path.join(REPO, rel), encoding="utf-8").read().split("\n")
        at = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
        assert at is not None, f"{rel}: no line starts {start!r}"
        end = lines.index("", at) if rel.endswith(".md") else at + 1  # a doc's paragraph, a config's line
        if DEFAULT_RUN not in " ".join(lines[at:end]):
            missing.append(f"{rel}: {start!r}... does not say {DEFAULT_RUN!r}")
    # the default run's configs state no other duration in minutes
    for rel in ("configs/default.yaml", "configs/sft_from_pretrain.yaml"):
        for i, line in enumerate(open(os.path.join(REPO, rel), encoding="utf-8"), 1):
            for figure in re.findall(r"(?:about )?\d+(?:\s*(?:-|–|to)\s*\d+)?\s*min(?:utes?)?\b", line):
                if figure != DEFAULT_RUN:
                    missing.append(f"{rel}:{i}: {figure!r} is not {DEFAULT_RUN!r}")
    assert not missing, "\n".join(missing)
