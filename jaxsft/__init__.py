"""jaxsft: supervised instruction fine-tuning of a small GPT in functional JAX.

Submodules load on first use (`jaxsft.checkpoint.restore(...)` works after `import jaxsft`), so
the command-line programs can set up their process before JAX starts (`cli.huge_pages`)."""
import importlib

__version__ = "0.1.0"
_MODULES = ("batching", "chatml", "checkpoint", "config", "data", "decode", "engine", "evaluate", "hf", "lora",
            "masks", "model", "parallel", "server", "setup", "steps", "tokenizer", "trainer")


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'jaxsft' has no attribute {name!r}")
