#!/usr/bin/env bash
# One short GPU check (issue 7): the train benchmark at the seed config and at a larger
# bf16 config, and the decoder benchmark. Run from the repo root on a machine with a GPU.
set -u
python3 -c "import jax; print(jax.devices())"
python3 bench/train_speed.py --train data/train.jsonl --steps 30 --peak-size 8192 --peak-dtype float32 2>&1 | tail -1
python3 bench/train_speed.py --train data/train.jsonl --steps 30 --peak-size 8192 --peak-dtype bfloat16 \
  --set train.dtype=bfloat16 2>&1 | tail -1
python3 bench/train_speed.py --train data/train.jsonl --steps 20 --peak-size 8192 --peak-dtype bfloat16 \
  --set model.d_model=1024 --set model.n_heads=16 --set model.n_layers=12 --set model.d_ff=4096 \
  --set model.max_seq_len=512 --set "train.buckets=[512]" --set train.pack_len=512 --set train.batch_size=96 --set train.dtype=bfloat16 2>&1 | tail -1
python3 bench/decode_speed.py --test data/test.jsonl --max-new-tokens 100 2>&1 | tail -1
# the numerical checks on this backend: KV cache == naive argmax, packed == padded, swiglu gradient
python3 -m pytest -q -x -p no:cacheprovider tests/test_decode.py tests/test_train.py tests/test_model.py \
  tests/test_attention.py 2>&1 | tail -15
# issue 36: SmolLM2-135M's shape, packed 2,048-token rows: blockwise + remat against cuDNN's attention (bf16)
python3 bench/memory.py --configs both,cudnn,cudnn-remat --dtype bfloat16 --steps 3 2>&1 | grep -v '^\['
