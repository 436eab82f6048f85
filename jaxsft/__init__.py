"""jaxsft: supervised instruction fine-tuning of a small GPT in functional JAX."""
from . import batching, chatml, checkpoint, config, data, decode, model, steps, tokenizer  # noqa: F401

__version__ = "0.1.0"
