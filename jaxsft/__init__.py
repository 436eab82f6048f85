"""jaxsft: supervised instruction fine-tuning of a small GPT in functional JAX."""
from . import chatml, checkpoint, config, data, decode, model, tokenizer, train  # noqa: F401

__version__ = "0.1.0"
