"""The fast lane for the event every token is: a text template and a one-pass chunk check.

Pure: no sockets, no asyncio. A stream translator that relays an event unchanged
whatever JSON string stands in one place of it publishes that event's bytes, cut
around the string, as a `TextTemplate`. `chunk_text` then recognises, in one
pass over a worker's read, a whole chunked-transfer chunk whose payload is that
template with another string, and returns the string: what the chunk decoder, the
SSE parser and the translator would have made of it is known without running them
(the same event bytes, passed unchanged, content when the string is not empty), so
a relay can write the chunk as it came and an aggregation append the string.
Anything else (None) takes the general path. `template_chunks` does the same for
a read that carries several whole chunks (a worker ahead of its reader), up to
the first chunk that is not the template's.
"""

from __future__ import annotations

from typing import Final

import orjson
from orjson import JSONDecodeError

from sidecar.chunked import LONGEST_CHUNK, SIZE_LINE_OF_CHUNK, first_chunk_end

#: (Final: a compiled build keeps it in a C static, not in the module's dict, per token)
_loads: Final = orjson.loads


class TextTemplate:
    """One event's raw bytes cut around a JSON string: `prefix` + string + `suffix`.

    A plain class with slots: made once per stream (a frozen dataclass's `__init__` sets
    each field through `object.__setattr__`, ~12,000 instructions), never changed after."""

    __slots__ = ("cut", "framed_cut", "framed_suffix", "heads", "prefix", "start", "suffix")

    prefix: bytes  # from the start of the event block to the string's opening quote
    suffix: bytes  # from after the closing quote to the end of the block (its blank line)
    start: int  # len(prefix)
    cut: int  # -len(suffix)
    framed_suffix: bytes  # the closing quote, suffix and the chunk's CRLF
    framed_cut: int  # -len(framed_suffix)
    #: per chunk length, what a whole chunk of that length starts with (its size line,
    #: `prefix` and the opening quote): one compare instead of two; at most _HEADS lengths
    #: are kept
    heads: dict[int, bytes]

    def __init__(self, prefix: bytes, suffix: bytes) -> None:
        self.prefix = prefix
        self.suffix = suffix
        self.start = len(prefix)
        self.cut = -len(suffix)
        self.framed_suffix = b'"' + suffix + b"\r\n"
        self.framed_cut = -len(self.framed_suffix)
        self.heads = {}

    def __repr__(self) -> str:
        return f"TextTemplate({self.prefix!r}, {self.suffix!r})"


#: chunk lengths whose head a template keeps (the first ones seen: a token is a few bytes,
#: so a stream's content chunks come in few lengths; at most ~4 KiB per stream)
_HEADS: Final = 16


def ends_overlap(prefix: bytes, suffix: bytes) -> bool:
    """Whether a block could start with `prefix` and a quote and end with a quote and `suffix`
    sharing more than that one quote (`...{"x":{"y":"b"},"content":` and `},"content":"Z"}]}`
    share `"},"content":"`): such a block has no string between them, and its cut runs
    backwards (Python slices give b"", mypyc's raise SystemError). A template is made only of
    ends that cannot overlap (checked once, when it is learnt: never per token)."""
    head = prefix + b'"'
    tail = b'"' + suffix
    pair = tail[:2]  # an overlap of two bytes or more begins with them
    at = head.find(pair)
    while at >= 0:
        if tail.startswith(head[at:]):
            return True
        at = head.find(pair, at + 1)
    return False


def template_text(literal: bytes) -> str | None:
    """The string when `literal` is exactly one JSON string, else None (not a string, not
    valid JSON, or anything around it: a line break there would cut the event's line)."""
    try:
        if literal[0] != 34 or literal[-1] != 34:
            return None
        return _loads(literal)  # a str: it starts and ends with a quote and parsed whole
    except (IndexError, JSONDecodeError):  # empty; a lone quote, a bad escape, ...
        return None


def chunk_text(data: bytes, template: TextTemplate) -> str | None:
    """The string in its place when `data` is one whole chunk (lower-case hex size, CRLF,
    payload, CRLF) whose payload is `template` with a JSON string there; None for anything
    else. This runs for every token: slices compared with `!=` cost about half what
    `startswith`/`endswith` do (those parse their arguments as a tuple on every call); the
    literal's quotes are compared with the template's bytes around it, and it is parsed
    here (what `template_text` does, without a call and its checks)."""
    n = len(data)
    head = template.heads.get(n)
    if head is None:
        line = SIZE_LINE_OF_CHUNK[n] if n < LONGEST_CHUNK else b""
        if not line:  # no whole chunk is this long
            return None
        head = line + template.prefix + b'"'
        if len(template.heads) < _HEADS:
            template.heads[n] = head
    start = len(head)
    cut = template.framed_cut
    if data[:start] != head or data[cut:] != template.framed_suffix:
        return None
    try:
        # the literal, quotes and all (whatever its length: shorter than two bytes, its
        # quotes are one byte or none, and it does not parse): a str when it parses whole
        return _loads(data[start - 1 : cut + 1])
    except JSONDecodeError:  # a lone quote inside, a bad escape, a control byte, ...
        return None


def template_chunks(data: bytes, template: TextTemplate) -> tuple[list[str], int]:
    """The whole chunks at the start of `data` that `chunk_text` accepts, one after the
    other: (their strings, how many bytes they span). The rest of `data` (from the first
    chunk that is cut short or not the template's) is left alone."""
    at = 0
    texts: list[str] = []
    while True:
        end = first_chunk_end(data, at)
        if not end:
            break
        text = chunk_text(data[at:end], template)
        if text is None:
            break
        texts.append(text)
        at = end
    return texts, at
