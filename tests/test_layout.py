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
