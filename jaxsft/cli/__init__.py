"""The command-line programs (bin/train, bin/pretrain, bin/chat, bin/eval, bin/inspect):
argument parsing and output only; the work is in the library. Shared plumbing here:
user mistakes become one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys

from ..config import UserError


def main_guard(fn):
    """Runs fn(); a UserError prints 'error: ...' and exits 2, Ctrl-C exits 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kw):
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
    printed and written to out_dir/test_report.json."""
    from .. import evaluate, trainer
    from ..files import write_json
    test_rows = evaluate.read_scored_rows(cfg.data.test) if score_test and cfg.data.test else None
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
    if test_rows and jax.process_count() == 1:
        from ..decode import Generator
        report = evaluate.score_rows(Generator.from_run(summary.run_dir, cfg.data.system_prompt), test_rows)
        print(f"best checkpoint on {cfg.data.test}: {report['n']} rows, greedy\n{evaluate.score_table(report)}")
        write_json(os.path.join(summary.run_dir, "test_report.json"), {"data": cfg.data.test, **report})
    print(f"done: {summary.steps} steps in {summary.seconds:.0f} s, best validation loss "
          f"{summary.best_val_loss:.4f}, checkpoint in {summary.run_dir}")
