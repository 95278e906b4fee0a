"""longext: long-context extension of Llama-family models in one fine-tuning job."""

__version__ = "0.1.0"
