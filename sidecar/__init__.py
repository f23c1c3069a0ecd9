"""sidecar: a daemon beside an LLM inference worker that makes its HTTP streams correct."""

from importlib.util import find_spec as _find_spec

__version__ = "0.1.0"

#: True when the hot-path modules were compiled with mypyc at install time (setup.py), False
#: for the pure-Python package (an editable install, SIDECAR_MYPYC=0, or no C compiler).
COMPILED: bool = not str(getattr(_find_spec("sidecar.pump"), "origin", "")).endswith(".py")
