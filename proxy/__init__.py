"""lmbridge: a local OpenAI-compatible gateway for LM Studio and other local model servers."""

__version__ = "0.1.0"
