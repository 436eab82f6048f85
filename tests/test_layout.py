"""The package's layout: its modules import one another in one direction."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycles():
    """scripts/import_cycles.py (imports inside functions count) finds no module that imports
    itself around a loop; its output names the modules and imports of any cycle."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "import_cycles.py"),
                        os.path.join(ROOT, "jaxsft")], capture_output=True, text=True, timeout=60)
    assert p.stdout.startswith("no import cycles") and p.returncode == 0, p.stdout + p.stderr


def _imports(path: str, module: str) -> set[str]:
    """The jaxsft modules `module` (dotted, without "jaxsft.") imports, inside functions too."""
    import ast
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".") if package else []
            parts = parts[:len(parts) - (node.level - 1)]
            if node.module:
                found.add(".".join(parts + [node.module]))
            else:
                found.update(".".join(parts + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("jaxsft.") for a in node.names if a.name.startswith("jaxsft."))
    return {m for m in found if m != module}


def test_readme_module_map_is_the_code_top_down():
    """README's layout table lists every module of jaxsft/ with exactly the package modules it
    imports, and each of those sits above it in the table (the map reads top-down)."""
    import re
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| `jaxsft/([\w/]+)\.py` \| .* \| ([\w., ]+) \|$", text, flags=re.M)
    listed = [(p.replace("/__init__", "").replace("/", "."), deps) for p, deps in rows]
    modules = {}
    for folder, _, names in os.walk(os.path.join(ROOT, "jaxsft")):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(folder, n)
                rel = os.path.relpath(path, os.path.join(ROOT, "jaxsft"))[:-3].replace(os.sep, ".")
                rel = rel.removesuffix(".__init__").removesuffix("__init__")
                if rel and rel != "serve":  # (the package jaxsft/ and serve/'s docstring-only __init__)
                    modules[rel] = path
    assert sorted(m for m, _ in listed) == sorted(modules)
    above = set()
    for m, deps in listed:
        # a package's own names (cli.main_guard) count as the package (cli)
        actual = {d if d in modules else d.rpartition(".")[0] for d in _imports(modules[m], m)} - {m}
        said = set() if deps.strip() == "nothing" else {d.strip() for d in deps.split(",")}
        assert said == actual, f"README's layout row for {m}: says {sorted(said)}, imports {sorted(actual)}"
        assert actual <= above, f"{m} imports {sorted(actual - above)}, listed below it"
        above.add(m)
