#!/usr/bin/env python3
"""Import cycles among a package's modules, imports inside functions included.

usage: python scripts/import_cycles.py [PACKAGE_DIR]   (default: jaxsft)
(a copy of the team's shared tool, kept here so that tests/test_layout.py runs on a fresh clone)
Prints each strongly connected group of modules that import each other (directly or around a
loop) with the edges that tie it, and exits 1 if there is any; prints "no import cycles" and exits 0
otherwise. An import inside a function counts: it hides a dependency, it does not remove it.
"""
import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, mods: set[str]) -> dict[str, list[str]]:
    """Modules of the package that `path` imports -> the names imported (or the module itself)."""
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods:
                    found.setdefault(a.name, []).append(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                target = sub if sub in mods else base
                if target in mods and target != me:
                    found.setdefault(target, []).append(a.name)
    found.pop(me, None)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1
        stack.append(v); on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop(); on.discard(w); group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "jaxsft").resolve()
    files = sorted(root.rglob("*.py"))
    mods = {module_name(root, p) for p in files}
    edges = {module_name(root, p): imports_of(root, p, mods) for p in files}
    # a package's __init__ is imported by every submodule import; leave it out of the loops
    graph = {m: {t for t in e if not (m.startswith(t + ".") or t == root.name)} for m, e in edges.items()}
    groups = strongly_connected(graph)
    if not groups:
        print(f"no import cycles among {len(mods)} modules of {root.name}")
        return 0
    for g in groups:
        print(f"cycle of {len(g)} modules: {', '.join(g)}")
        for m in g:
            for t in sorted(graph[m] & set(g)):
                print(f"  {m} -> {t}: {', '.join(sorted(set(edges[m][t])))}")
    print(f"{len(groups)} import cycle(s), {sum(map(len, groups))} modules in them")
    return 1


if __name__ == "__main__":
    sys.exit(main())
