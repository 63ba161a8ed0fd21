"""LLM Fine-Tuning From Scratch: tested reference implementations behind the course notebooks."""

__version__ = "0.1.0"
