"""cli.huge_pages: programs restart themselves once with glibc's malloc on transparent huge
pages where the kernel hands them out only on request (bench/README.md: ~29,000 page faults a
step at the seed config without), keep the user's own tunables, and can be told not to."""
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import os, sys; from jaxsft.cli import huge_pages; print('start', flush=True); huge_pages(); "
         "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)")


def _applies() -> bool:
    """Whether this machine is one where huge_pages restarts (madvise THP, glibc)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            madvise = "[madvise]" in f.read()
    except OSError:
        return False
    return sys.platform == "linux" and madvise and platform.libc_ver()[0] == "glibc"


def _probe(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXSFT_HUGE_PAGES")}
    env.update(env_extra, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", PROBE, "a b", "--x"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_restarts_once_with_the_tunable_and_the_same_arguments():
    lines = _probe({})
    if _applies():
        assert lines == ["start", "start", "glibc.malloc.hugetlb=1 ['a b', '--x']"]
    else:  # nothing to do here: no restart, nothing set
        assert lines == ["start", "None ['a b', '--x']"]


def test_keeps_the_users_tunables_and_respects_an_explicit_setting():
    lines = _probe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    want = "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1" if _applies() else "glibc.malloc.arena_max=4"
    assert lines[-1] == f"{want} ['a b', '--x']"
    assert _probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == ["start", "glibc.malloc.hugetlb=0 ['a b', '--x']"]
    assert _probe({"JAXSFT_HUGE_PAGES": "0"}) == ["start", "None ['a b', '--x']"]


def test_only_a_program_restarts_itself():
    """main_guard restarts bin/<name> and jaxsft-<name>, never a process that imported the CLI
    (pytest, a script calling main())."""
    from jaxsft.cli import _is_program
    from jaxsft.cli.train import main

    def fake(name):
        class M:
            __file__ = name
        return M

    saved = sys.modules["__main__"]
    try:
        for name, want in [("/x/bin/train", True), ("/usr/bin/jaxsft-train", True), ("/x/bin/chat", False),
                           ("/usr/lib/python3/site-packages/pytest/__main__.py", False)]:
            sys.modules["__main__"] = fake(name)
            assert _is_program(main.__wrapped__) is want, name
    finally:
        sys.modules["__main__"] = saved
