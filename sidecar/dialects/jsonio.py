"""JSON in and out of the sidecar: client request bodies, and the worker's events and documents.

Pure: no sockets, no asyncio. orjson reads and writes everything it can; the standard
library only where orjson refuses what is JSON all the same (a lone UTF-16 surrogate
escape, a number past a double, nesting past 254 levels) or would change it (an integer
past 64 bits), so what the sidecar passes on says what it came saying.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import orjson


class BadRequest(Exception):
    """The client's request body cannot be adapted (malformed JSON): answered 400, never forwarded."""


class StreamProtocolError(Exception):
    """The worker's stream or document is not what the dialect can read (not JSON, wrong shape)."""


def read_request(body: bytes) -> dict[str, Any]:
    """The client's JSON request body as a dict; BadRequest when it is not one."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


# orjson reads an integer past 64 bits as a float (a seed of 2**70 would be forwarded as
# 1.1805916207174113e+21): a body to re-encode that holds a run of 19 digits anywhere is
# read again, and written, by the standard library, which keeps every integer exact. The
# run is looked for only then, with every digit made a "0" (a regex is ten times slower).
_DIGITS_AS_ZERO: Final = bytes(48 if 48 <= c <= 57 else 32 for c in range(256))
_LONG_RUN: Final = b"0" * 19


def _has_long_digit_run(data: bytes) -> bool:
    """Whether `data` holds 19 digits in a row: an integer orjson might read as a float."""
    # (find, not `in`: a bytes `in` first tries its operand as an integer, and makes and
    # drops a TypeError, ~800 instructions, per test)
    return data.translate(_DIGITS_AS_ZERO).find(_LONG_RUN) >= 0


def encode_request(
    request: dict[str, Any], body: bytes, changes: dict[str, Any], dropped: tuple[str, ...] = ()
) -> bytes:
    """The worker's body: `body` (read into `request` by `read_request`) with the top-level
    `changes` made and the `dropped` keys removed. BadRequest when it cannot be written."""
    if not _has_long_digit_run(body):
        _change(request, changes, dropped)
        try:
            return orjson.dumps(request)
        except orjson.JSONEncodeError:
            pass  # nested deeper than orjson writes (254, it reads 1,024): the exact way
    try:
        request = json.loads(body)  # (orjson has already refused what is not JSON)
        _change(request, changes, dropped)
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()
    except RecursionError:
        raise BadRequest("request body is nested too deeply to forward") from None


def _change(request: dict[str, Any], changes: dict[str, Any], dropped: tuple[str, ...]) -> None:
    request.update(changes)
    for key in dropped:
        request.pop(key, None)


def read_document(body: bytes) -> dict[str, Any]:
    """The worker's JSON document as a dict; StreamProtocolError when it is not one.

    A document with a run of 19 digits is read by `read_beyond_orjson`, which keeps integers
    past 64 bits as they came (orjson makes them floats, and the document is written again
    with its cost): an Anthropic `tool_use` input is the worker's object, numbers and all.
    A document is whole, so a UTF-16 surrogate read from an escape is mended at once, as
    `dumps_document` writes it (each pair its character, one alone U+FFFD): the events made
    from it (JSON -> SSE) are then JSON every reader takes, orjson too, as the document is.
    """
    return _read_worker_json(body, "the worker's document", _has_long_digit_run(body), whole=True)


def read_event(data: str) -> dict[str, Any]:
    """One worker event's JSON data as a dict; StreamProtocolError when it is not one.

    JSON that orjson refuses is read again by `read_beyond_orjson` (only then): a JavaScript
    gateway that slices strings by UTF-16 unit may send an emoji's escaped halves in two
    events (`"\\ud83d"`, then `"\\ude00"`), each valid JSON text alone. Data with a run
    of 19 digits is read that way from the start, as documents are: an event may be written
    again (cost injected, merged into one document) and its integers past 64 bits kept.
    """
    return _read_worker_json(data, "event data", _has_long_digit_run(data.encode()))


def _read_worker_json(
    data: str | bytes, what: str, exact: bool = False, whole: bool = False
) -> dict[str, Any]:
    """`data` read as a JSON object: by orjson, else (or with `exact`) by `read_beyond_orjson`,
    and then, when it is `whole` (a document), with its surrogates mended (see `_mended`)."""
    by_orjson = not exact
    try:
        obj = orjson.loads(data) if by_orjson else read_beyond_orjson(data)
    except ValueError as exc:  # (orjson.JSONDecodeError is one)
        try:
            if not by_orjson:
                raise
            by_orjson = False
            obj = read_beyond_orjson(data)
        except ValueError:
            raise StreamProtocolError(f"{what} is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise StreamProtocolError(f"{what} is not a JSON object")
    if whole and not by_orjson:  # (orjson reads no surrogate: nothing to mend then)
        try:
            obj = _mended(obj, True)
        except RecursionError:
            raise StreamProtocolError(f"{what} is nested too deeply to write") from None
    return obj


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


#: The integers orjson reads and writes as ints: ORJSON_INT_MIN <= n < ORJSON_INT_END.
ORJSON_INT_MIN: Final = -(2**63)
ORJSON_INT_END: Final = 2**64


def json_int(value: int) -> Any:
    """`value` as orjson can write it: the int itself within orjson's 64-bit range, else an
    `orjson.Fragment` of its digits (orjson refuses the whole document for such an int)."""
    return value if ORJSON_INT_MIN <= value < ORJSON_INT_END else orjson.Fragment(str(value))


def _exact_int(text: str) -> Any:
    """An integer as orjson writes it: an int in the 64-bit range, else its text as it came."""
    if len(text) <= 21:  # (-9223372036854775808 .. 18446744073709551615)
        value = int(text)
        if ORJSON_INT_MIN <= value < ORJSON_INT_END:
            return value
    return orjson.Fragment(text)


def _exact_float(text: str) -> Any:
    """A float, or its text as it came when a double cannot hold it (`1e400`: RFC 8259 puts no
    range on numbers, and orjson would write the infinity as `null`)."""
    value = float(text)
    return value if math.isfinite(value) else orjson.Fragment(text)


def read_beyond_orjson(text: str | bytes) -> Any:
    """`text` read by the standard library, for JSON that orjson refused but is JSON all the
    same: a lone UTF-16 surrogate escape (read as a lone surrogate in a str), a number past a
    double (kept as an `orjson.Fragment` of its text, as are integers past 64 bits). Raises
    ValueError for what is not JSON (`NaN` and `Infinity` included). Only where orjson has
    failed, or would lose an integer: the standard library is several times slower."""
    try:
        return json.loads(
            text, parse_constant=_not_json, parse_int=_exact_int, parse_float=_exact_float
        )
    except RecursionError:  # nested deeper than the interpreter goes
        raise ValueError("nested too deep") from None


def joined_surrogates(text: str) -> str:
    """`text` with each pair of UTF-16 surrogates (an emoji's halves, which came in two events)
    joined into its character, and a surrogate still alone (its other half never came) made
    U+FFFD, as a JavaScript TextEncoder writes one: no str with a surrogate is UTF-8."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def model_name(value: Any) -> str | None:
    """A worker's model name: a non-empty string, else None. One read from an escaped lone
    surrogate (see `read_beyond_orjson`) gets U+FFFD in its place (`joined_surrogates`): the
    ledger, metrics and logs that name it write UTF-8."""
    if not isinstance(value, str) or not value:
        return None
    return value if value.isascii() else joined_surrogates(value)


def json_fragment(text: str) -> orjson.Fragment | None:
    """`text`, when it is JSON, to be written as it is into a document (None when it is not).

    orjson validates it; what orjson refuses is validated by `read_beyond_orjson`, after its
    surrogate halves (an emoji's, cut between two event strings) are joined. So the text is
    written unchanged even where orjson could not hold its value: an integer past 64 bits
    (orjson reads a float), a number past a double (`1e400`). (An escaped lone surrogate,
    `\\ud83d` as six characters, is kept as it came: JSON's grammar allows it.)
    """
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        text = joined_surrogates(text)
        try:
            read_beyond_orjson(text)
        except ValueError:
            return None
    return orjson.Fragment(text)


#: How deep orjson writes containers (its recursion limit): `_mended` goes no deeper, so it
#: refuses the same JSON on both builds (mypyc code raises no RecursionError of its own, and
#: Python's, two frames per level, would come at a depth that depends on the stack).
DEEPEST_WRITTEN = 254


def _mended(value: Any, whole: bool, depth: int = 0) -> Any:
    """`value` with every str that holds a surrogate made one orjson writes (see
    `_dumps_worker_data`); RecursionError for containers nested deeper than orjson writes
    (`depth`: the containers around `value`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            if whole:
                return joined_surrogates(value)
            return orjson.Fragment(json.dumps(value))  # ASCII, `\ud83d` escapes
        return value
    if isinstance(value, (dict, list)):
        depth += 1
        if depth > DEEPEST_WRITTEN:
            raise RecursionError("nested deeper than orjson writes")
        if isinstance(value, list):
            return [_mended(v, whole, depth) for v in value]
        # (a key cannot be a fragment: a surrogate in a key is mended as in a document)
        return {_mended(k, True): _mended(v, whole, depth) for k, v in value.items()}
    return value


def _dumps_worker_data(obj: Any, whole: bool) -> bytes:
    """`obj`, which holds a worker's text, as JSON: orjson's, and only where orjson refuses
    it, the same with its strings mended; StreamProtocolError for what cannot be written.

    orjson refuses two things a worker's JSON may hold. UTF-16 surrogates (read by
    `read_beyond_orjson` from escapes): an event (`whole` False) keeps each as the escape it
    came as (`\\ud83d`), so the half of a pair goes to the client as the worker sent it and
    the client's JSON reader joins it with the other half in the next event; a document
    (`whole` True), whose strings are joined from all the events, gets each pair as its
    character and a surrogate still alone as U+FFFD (`joined_surrogates`), so every JSON
    reader, orjson too, reads it. And nesting deeper than the 254 levels orjson writes (it
    reads 1,024): a protocol error of the worker's, not a crash.
    """
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        pass
    try:
        return orjson.dumps(_mended(obj, whole))
    except (orjson.JSONEncodeError, RecursionError):
        raise StreamProtocolError("the worker's JSON is nested too deeply to write") from None


def dumps_document(obj: Any) -> bytes:
    """A document the sidecar built from, or read as, a worker's answer, as JSON (see
    `_dumps_worker_data`)."""
    return _dumps_worker_data(obj, whole=True)


def dumps_event_data(obj: Any) -> bytes:
    """The data of one event that holds a worker's text, as JSON (see `_dumps_worker_data`)."""
    return _dumps_worker_data(obj, whole=False)
