"""tunepipe: a declarative, cached pipeline compiler for LLM fine-tuning."""

__version__ = "0.1.0"
