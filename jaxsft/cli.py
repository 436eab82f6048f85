"""Shared command-line plumbing: user mistakes become one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys

from .config import UserError


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


def run_training(cfg, args: argparse.Namespace) -> None:
    """train.train(cfg) for bin/train and bin/pretrain: divergence or a full disk exit 1, Ctrl-C
    prints the command that resumes the run and exits 130; ends with a one-line summary."""
    from . import train
    try:
        summary = train.train(cfg, resume=args.resume, progress=not args.no_progress)
    except train.TrainingDiverged as e:
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
    print(f"done: {summary['steps']} steps, best validation loss {summary['best_val_loss']:.4f}, "
          f"checkpoint in {summary['run_dir']}")
