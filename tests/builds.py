"""Which build of sidecar the tests run on, and what tells the two apart.

tests/run.sh runs the suite on the pure-Python package and on the mypyc-compiled one
(setup.py). They behave the same to a client; inside, a compiled class has no `__slots__`
(its attributes are native fields) and a compiled function checks its arguments' types at run
time, so a test that hands one a stand-in object runs on the pure build only.
"""

from __future__ import annotations

import pytest

import sidecar

COMPILED: bool = sidecar.COMPILED

#: For a test that drives sidecar's code with stand-in objects (a fake Exchange, a
#: SimpleNamespace): compiled code refuses them with a TypeError, by design.
pure_only = pytest.mark.skipif(
    COMPILED, reason="hands compiled code a stand-in object; runs on the pure build"
)


def attribute_names(cls: type) -> tuple[str, ...]:
    """The instance attributes of a slotted class, pure (`__slots__`) or compiled (mypyc's
    native fields)."""
    names = cls.__dict__.get("__slots__")
    if names is None:
        names = cls.__mypyc_attrs__  # type: ignore[attr-defined]
    return tuple(name for name in names if not name.startswith("__"))
