"""The command-line programs (bin/train, bin/pretrain, bin/chat, bin/eval, bin/inspect):
argument parsing and output only; the work is in the library. Shared plumbing here:
user mistakes become one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import functools
import gc
import os
import shlex
import sys

from ..config import UserError


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def huge_pages():
    """Restarts this process with glibc's malloc backing its large buffers by transparent huge
    pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1), where the kernel gives them only on request
    (/sys/kernel/mm/transparent_hugepage/enabled is `madvise`, Debian's and Ubuntu's default).

    XLA on CPU allocates a step's temporaries afresh every step: at the seed config that was
    ~29,000 page faults (120 MB) a step, and the step measured 8-10% faster with huge pages
    (bench/README.md). Does nothing where the tunable is already set, where the kernel already
    uses huge pages always or never, off glibc, or with JAXSFT_HUGE_PAGES=0. Must run before
    JAX starts; the tunable is read when a process starts, hence the restart (os.execv: the same
    interpreter, flags and arguments)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or "glibc.malloc.hugetlb" in tunables or os.environ.get("JAXSFT_HUGE_PAGES") == "0":
        return
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[madvise]" not in f.read():
                return
    except OSError:
        return
    import platform
    if platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def _is_program(fn) -> bool:
    """Whether this process was started as fn's program (bin/train, jaxsft-train, ...), not a
    test or a script that imported it and calls main() itself."""
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    name = fn.__module__.rsplit(".", 1)[-1]
    return os.path.basename(main) in (name, f"jaxsft-{name}")


# Python's cyclic collector with full collections 10x rarer and young ones 14x: a program's start
# (JAX, flax, orbax: about a million objects) otherwise runs ~5 full collections, 0.33 s of a tiny
# 5 s bin/train run; after this none, and 0.13 s of collections in all against 0.43 s (gc.callbacks,
# session 14). Device arrays are freed by their reference counts, not by this collector.
GC_THRESHOLDS = (10_000, 10, 100)


def main_guard(fn):
    """Runs fn(); a UserError prints 'error: ...' and exits 2, Ctrl-C exits 130. Started as a
    program, the process first restarts itself with huge pages (`huge_pages`) and sets the
    collector's thresholds (GC_THRESHOLDS)."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
        if _is_program(fn):
            huge_pages()
            gc.set_threshold(*GC_THRESHOLDS)
        try:
            return fn(*args, **kw)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(0)
    return wrapper


def train_args(description: str) -> argparse.Namespace:
    """The command line of bin/train and bin/pretrain: --config, --set, --resume, --no-progress."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.max_steps=20 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest state")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args()


def run_training(cfg, args: argparse.Namespace, score_test: bool = False) -> None:
    """trainer.train(cfg) for bin/train and bin/pretrain: divergence or a full disk exit 1, Ctrl-C
    prints the command that resumes the run and exits 130; ends with a one-line summary.

    score_test (bin/train): data.test, read and checked before training, is then answered
    with the best checkpoint and scored per category (as bin/eval does); the table is
    printed and written to out_dir/test_report.json. A DPO run whose data.test holds
    preference pairs reports its preference figures on them instead (as bin/eval --pairs),
    and prints greedy answers to three of their prompts."""
    from .. import trainer
    test = read_test(cfg) if score_test and cfg.data.test else None
    try:
        summary = trainer.train(cfg, resume=args.resume, progress=not args.no_progress)
    except trainer.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if os.path.isfile(os.path.join(cfg.out_dir, "config.json")):
            cmd = [os.path.relpath(sys.argv[0])] + [a for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
            print(f"resume with: {shlex.join(cmd)}", file=sys.stderr)
        else:
            print("interrupted before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # e.g. a full disk: the last complete checkpoints stay readable
        print(f"error: {e.filename or cfg.out_dir}: {e.strerror or e}; the last complete checkpoints in "
              f"{cfg.out_dir} are kept", file=sys.stderr)
        sys.exit(1)
    import jax
    if test and jax.process_count() == 1:
        report_test(summary.run_dir, cfg, test)
    print(f"done: {summary.steps} steps in {summary.seconds:.0f} s, best validation loss "
          f"{summary.best_val_loss:.4f}, checkpoint in {summary.run_dir}")


def read_test(cfg):
    """data.test, read and checked before training: ("pairs", preference pairs) for a DPO run
    whose file holds pairs, else ("rows", rows with reference answers)."""
    from .. import evaluate
    from ..datasets_io import holds_pairs, read_pairs
    if cfg.train.objective == "dpo" and holds_pairs(cfg.data.test, cfg.data):
        return "pairs", read_pairs(cfg.data.test, cfg.data)
    return "rows", evaluate.read_scored_rows(cfg.data.test, cfg.data)


SAMPLES = 3  # greedy answers printed after a DPO run's test pairs


def report_test(run_dir: str, cfg, test) -> None:
    """The best checkpoint on data.test (read_test's): the table printed and written to
    run_dir/test_report.json; after pairs, greedy answers to the first SAMPLES prompts."""
    from .. import evaluate, preference
    from ..data import describe
    from ..decode import Generator
    from ..files import write_json
    kind, items = test
    gen = Generator.from_run(run_dir, cfg.data.system_prompt)
    if kind == "rows":
        report = evaluate.score_rows(gen, items)
        print(f"best checkpoint on {describe(cfg.data.test)}: {report['n']} rows, greedy\n"
              f"{evaluate.score_table(report)}")
    else:
        report = preference.report(run_dir, items, gen.system_prompt, (gen.params, gen.cfg, gen.tok))
        print(f"best checkpoint on {describe(cfg.data.test)}: {report['n']} pairs\n{preference.describe(report)}\n"
              f"{evaluate.preference_table(report)}")
        samples = items[:SAMPLES]
        print("greedy answers:")
        for p, a in zip(samples, gen.answer([p.prompt for p in samples])):
            print(f"  {p.question} -> {a}")
    write_json(os.path.join(run_dir, "test_report.json"), {"data": cfg.data.test, **report})
