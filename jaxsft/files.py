"""Files written whole or not at all: through a temporary file and an atomic rename,
so a reader (or a run killed mid-write) sees the old file or the new one."""
from __future__ import annotations

import contextlib
import json
import os


@contextlib.contextmanager
def atomic(path: str, mode: str = "w"):
    """with atomic(path) as f: ... writes `path` only when the block completes."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj, indent: int = 1) -> None:
    """obj as UTF-8 JSON (non-ASCII kept readable), written atomically."""
    with atomic(path) as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")
