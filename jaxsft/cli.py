"""Shared command-line plumbing: user mistakes become one line on stderr and exit 2."""
from __future__ import annotations

import functools
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
