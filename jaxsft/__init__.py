"""jaxsft: supervised instruction fine-tuning of a small GPT in functional JAX.

Submodules load on first use (`jaxsft.runs.restore(...)` works after `import jaxsft`), so
the command-line programs can set up their process before JAX starts (`cli.huge_pages`)."""
import importlib

__version__ = "0.1.0"


def __getattr__(name):
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":  # the submodule exists; something it imports does not
            raise
        raise AttributeError(f"module 'jaxsft' has no attribute {name!r}") from None
