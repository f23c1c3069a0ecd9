"""Route matching: (method, raw request target) -> the first matching route.

Pure: no I/O. Matches the raw path before `?`, never a normalized one, and
refuses to match paths that a normalizing worker might read differently
(dot segments, `//`, encoded slashes, encoded characters that need no
encoding), so a route can never be bypassed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # config imports this module (a route that can never match is refused)
    from sidecar.config import RouteConfig

R = TypeVar("R", bound="RouteConfig")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """Split a request target into (path, query) at the first `?` (query keeps no `?`)."""
    path, _, query = target.partition(b"?")
    return path, query


#: A percent-encoded `/` or `\`, or an encoded character RFC 3986 calls unreserved (letters,
#: digits, `-`, `.`, `_`, `~`), which no URI needs encoded and every worker decodes: with
#: them `/v1/chat/complet%69ons` would be the chat endpoint to the worker and not to routes.
_ENCODED = rb"%(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa]|2[D-Fd-f]|5[CcFf]|7[Ee])"
#: What makes a path that starts with `/` ambiguous, in one search (each check on its own
#: costs about as much as the whole search): `//`, a backslash, a `.` or `..` segment
#: (after a `/`, up to the next one or the end) or an `_ENCODED` character.
_AMBIGUOUS = re.compile(rb"//|\\|/\.\.?(?:/|\Z)|" + _ENCODED)


def is_ambiguous_path(path: bytes) -> bool:
    """True for paths that must match no route: `.`/`..` segments, `//`, backslashes, and
    `%2F`, `%5C` or an encoded unreserved character (`%2E`, `%41`, ...)."""
    return not path.startswith(b"/") or _AMBIGUOUS.search(path) is not None


def match_route(routes: Sequence[R], method: str | None, target: bytes) -> R | None:
    """The first route whose `match` accepts this method (None: any) and raw target, else None."""
    path_bytes, _ = split_target(target)
    if is_ambiguous_path(path_bytes):
        return None
    try:
        path = path_bytes.decode("ascii")
    except UnicodeDecodeError:
        return None
    for route in routes:
        match = route.match
        if method is not None and match.methods is not None and method not in match.methods:
            continue
        if match.path is not None and path != match.path:
            continue
        if match.path_prefix is not None and not path.startswith(match.path_prefix):
            continue
        return route
    return None
