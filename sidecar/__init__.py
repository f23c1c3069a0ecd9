"""sidecar: a daemon beside an LLM inference worker that makes its HTTP streams correct."""

__version__ = "0.1.0"
