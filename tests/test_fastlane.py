"""The fast lane: a whole chunk carrying one template event is written as it came
(relaying) or has its string appended (aggregating).

`chunk_text` is checked on its own (every size-line width, every way to miss),
then the relay and aggregate handlers are driven by the real response pump (the
lane first while the decoder is between chunks, else decoder -> parser ->
translator) against the same handler with the lane switched off: the client gets
the same bytes and the translator counts the same content, whatever the worker's
chunking.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.chunked import LONGEST_CHUNK, ChunkedDecoder, frame
from sidecar.config import Limits
from sidecar.fastlane import (
    TextTemplate,
    chunk_text,
    ends_overlap,
    template_chunks,
    template_text,
)
from sidecar.handlers import AggregateHandler, BodyHandler, RelayHandler
from sidecar.pump import ResponsePump
from sidecar.sse import SSEParser
from sidecar.upstream import UpstreamConnection
from tests.builds import pure_only
from tests.test_openai_template import translators, worker_streams

PREFIX = b'data: {"choices":[{"delta":{"content":'
SUFFIX = b'}}]}\n\n'
TEMPLATE = TextTemplate(PREFIX, SUFFIX)


def chunk_with(literal: bytes) -> bytes:
    return frame(PREFIX + literal + SUFFIX)


def verdict(data: bytes) -> int:
    """`chunk_text` as a count: 1 a non-empty string, 0 an empty one, -1 not the lane's."""
    text = chunk_text(data, TEMPLATE)
    return -1 if text is None else 1 if text else 0


def test_reads_as_long_as_the_longest_lane_chunk_or_longer_are_not_the_lanes() -> None:
    """The lane keeps chunks of at most 4095 payload bytes; a longer read (a bigger chunk,
    or several) goes the general way rather than failing."""
    room = 4096 - len(PREFIX) - len(SUFFIX) - 2
    assert verdict(chunk_with(b'"' + b"a" * room + b'"')) == -1
    for n in (LONGEST_CHUNK - 1, LONGEST_CHUNK, LONGEST_CHUNK + 1):
        assert verdict(b"x" * n) == -1


@pytest.mark.parametrize("size", [1, 5, 13, 14, 15, 16, 17, 200, 254, 255, 256, 257, 4000, 4095])
def test_every_size_line_width(size: int) -> None:
    """Payloads of every hex width around the boundaries (1, 2 and 3 digits)."""
    room = size - len(PREFIX) - len(SUFFIX) - 2
    if room < 0:
        data = frame(b"x" * size)
        assert verdict(data) == -1
        return
    literal = b'"' + b"a" * room + b'"'
    data = chunk_with(literal)
    assert len(data) - len(frame(b"")) + len(b"0\r\n") - 2 >= 0
    assert verdict(data) == (1 if room else 0)
    assert chunk_text(data, TEMPLATE) == "a" * room


@pytest.mark.parametrize(
    ("literal", "want"),
    [
        (b'"tok"', 1),
        (b'""', 0),
        (b'"\\u00e9\\n"', 1),
        (b'"a\\"b"', 1),
        (b'"abc', -1),
        (b"123", -1),
        (b"null", -1),
        (b'"a"\n', -1),
        (b' "a"', -1),
        (b'"a","x":"b"', -1),
        (b'"bad \\q escape"', -1),
        (b'"raw\nline"', -1),
        (b'"\xff"', -1),
    ],
)
def test_the_literal_decides(literal: bytes, want: int) -> None:
    assert verdict(chunk_with(literal)) == want
    text = template_text(literal)
    assert (text is None) == (want < 0)
    assert chunk_text(chunk_with(literal), TEMPLATE) == text
    if text is not None:
        assert text == orjson.loads(literal)


#: the bytes a literal is made of here: quotes, escapes and what follows one, control
#: bytes, line ends, UTF-8 (whole and cut), surrogate escapes, the template's own bytes
_HOSTILE = st.lists(
    st.sampled_from(
        [b'"', b"\\", b"u", b"d83d", b"de00", b"00e9", b"n", b"a", b" ", b"\x00", b"\x1f",
         b"\x7f", b"\n", b"\r", b"\xc3\xa9", b"\xc3", b"\xff", b"}", b"]", b",", b":", SUFFIX,
         PREFIX[-12:]]
    ),
    max_size=10,
).map(b"".join)


@settings(max_examples=3000, deadline=None)
@given(_HOSTILE, st.booleans(), st.booleans())
def test_the_lane_reads_a_literal_as_the_json_parse_does(
    middle: bytes, opened: bool, closed: bool
) -> None:
    """`chunk_text` compares the literal's quotes with the template's bytes around it and
    parses the rest once: over hostile literals (an empty or one-byte one, a quote or an
    escape inside, control bytes, bad UTF-8, the template's own bytes) it says what
    `template_text`, the literal parsed alone, says."""
    literal = (b'"' if opened else b"") + middle + (b'"' if closed else b"")
    assert chunk_text(chunk_with(literal), TEMPLATE) == template_text(literal)
    # and for templates whose chunks have size lines of two and three hex digits
    for pad in (b"x" * 200, b"x" * 3900):
        template = TextTemplate(PREFIX + pad, SUFFIX)
        assert chunk_text(frame(PREFIX + pad + literal + SUFFIX), template) == template_text(literal)


@pytest.mark.parametrize(
    "data",
    [
        b"%X\r\n" % 60 + PREFIX + b'"xxxxxxxxxxxxxxxxxxxxxxxxxx"' + SUFFIX[:0],  # upper-case size
        frame(PREFIX + b'"a"' + SUFFIX)[:-2] + b"XX",  # no CRLF after the payload
        b"0" + frame(PREFIX + b'"a"' + SUFFIX),  # a leading zero
        frame(PREFIX.replace(b"content", b"kontent") + b'"a"' + SUFFIX),  # another prefix
        frame(PREFIX + b'"a"' + SUFFIX + b"data: x\n\n"),  # a second event
        frame(PREFIX + b'"a"' + SUFFIX)[:-1],  # cut short
        b"ff\r\n" + PREFIX + b'"a"' + SUFFIX + b"\r\n",  # a size that lies
    ],
)
def test_anything_else_is_not_the_lane(data: bytes) -> None:
    assert verdict(data) == -1


def test_a_template_keeps_the_heads_of_a_few_lengths_and_reads_every_length() -> None:
    template = TextTemplate(PREFIX, SUFFIX)
    for _ in range(2):  # the second time round, the first lengths come from the cache
        for room in range(40):
            data = chunk_with(b'"' + b"a" * room + b'"')
            assert chunk_text(data, template) == "a" * room
            line, _, rest = data.partition(b"\r\n")
            assert chunk_text(line.upper() + b"0\r\n" + rest, template) is None
            if line != line.upper():  # a size line with a hex letter, written upper-case
                assert chunk_text(line.upper() + b"\r\n" + rest, template) is None
    assert len(template.heads) == 16  # bounded: the memory a stream holds


_PIECES = st.one_of(
    st.sampled_from([b'"tok"', b'""', b'"a\\"b"', b'"\\u00e9"', b'"' + b"x" * 300 + b'"']).map(chunk_with),
    st.sampled_from([b"123", b'"abc', b'"a","x":"b"']).map(chunk_with),  # not the template's
    st.sampled_from([b"data: [DONE]\n\n", b": keep-alive\n\n"]).map(frame),
    st.sampled_from([b"0\r\n\r\n", b"0" + chunk_with(b'"a"'), b"%X\r\n" % 45 + b"x" * 45 + b"\r\n"]),
    st.binary(max_size=12),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=8), st.integers(0, 400))
def test_several_chunks_in_one_read(pieces: list[bytes], cut: int) -> None:
    """`template_chunks` takes exactly the run of whole chunks `chunk_text` accepts one by
    one from the start of a read, with their strings; a chunk cut short ends the run."""
    data = b"".join(pieces)
    data = data[: len(data) - cut] if cut < len(data) else data
    want_texts: list[str] = []
    want_taken = 0
    while True:  # by brute force: the one end at which chunk_text takes a whole chunk
        ends = [e for e in range(want_taken + 1, len(data) + 1) if data[e - 2 : e] == b"\r\n"]
        texts = [(chunk_text(data[want_taken:e], TEMPLATE), e) for e in ends]
        taken = [(text, e) for text, e in texts if text is not None]
        if not taken:
            break
        assert len(taken) == 1
        want_texts.append(taken[0][0])
        want_taken = taken[0][1]
    assert template_chunks(data, TEMPLATE) == (want_texts, want_taken)


# -- the handler, driven like the pump drives it -------------------------------------------


class FakeExchange:
    """What the handlers and ResponsePump ask of an exchange; records what reaches the client."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.sent: list[bytes] = []
        self.loop = loop
        self.runtime = SimpleNamespace(metrics=SimpleNamespace(upstream_error=lambda code: None))
        self.generation = SimpleNamespace(config=SimpleNamespace(limits=Limits()))
        self.failure: Any = None
        self.outcome = "ok"
        self._client_gone = False
        self.pump: Any = None
        self.client = SimpleNamespace(write=self.sent.append)

    def start_event_stream(self, headers: Any, hold: bool = False) -> bytes | None:
        self.sent.append(b"<head>")  # never held here: these tests feed no pump.start()
        return None

    def body_writer(self) -> Callable[[bytes], None]:
        return self.write_data

    def framed_writer(self) -> Callable[[bytes], None]:
        return self.sent.append

    def write_data(self, data: bytes) -> None:
        self.sent.append(frame(data))

    def end_response(self) -> None:
        self.sent.append(b"0\r\n\r\n")

    def respond(self, status: int, headers: Any, body: bytes) -> None:
        self.sent.append(b"<%d>" % status + body)

    def respond_error(self, status: int, code: str, message: str, outcome: str) -> None:
        self.sent.append(b"<%d %s>" % (status, code.encode()))


def pumped(
    raw_body: bytes,
    cuts: list[int],
    lane: bool,
    aggregate: bool = False,
    writes: list[bytes] | None = None,
    fed: list[bytes] | None = None,
) -> tuple[bytes, str | None, int]:
    """A chunked worker body, read in the pieces `cuts` makes by a real worker connection
    (no socket: its `data_received` is called), through the real response pump and a relay
    (or aggregate) handler: what the client reads (a relay's body de-chunked, an
    aggregation's answer), the failure, the content count. `fed` collects the events that
    reached the translator the general way."""
    loop = asyncio.new_event_loop()
    try:
        fast, _ = translators(chat=True, aggregate=aggregate, include_usage=True)
        if fed is not None:
            feed = fast.feed

            def recording(event: Any) -> bytes | None:
                fed.append(event.raw)
                return feed(event)

            fast.feed = recording  # type: ignore[method-assign]
        exchange = FakeExchange(loop)
        handler: BodyHandler
        if aggregate:
            handler = AggregateHandler(exchange, fast, SSEParser())  # type: ignore[arg-type]
        else:
            handler = RelayHandler(exchange, [], fast, SSEParser())  # type: ignore[arg-type]
        if not lane:
            handler.lane = False
        route = SimpleNamespace(upstream=SimpleNamespace(idle_timeout=60.0), heartbeat=None)
        upstream = UpstreamConnection(loop, max_head=65536)
        pump = ResponsePump(exchange, upstream, handler, route, ChunkedDecoder())  # type: ignore[arg-type]
        upstream.consumer = pump
        for a, b in itertools.pairwise([0, *cuts, len(raw_body)]):
            if raw_body[a:b] and not pump.finished:
                upstream.data_received(raw_body[a:b])
    finally:
        loop.close()
    if writes is not None:
        writes.extend(exchange.sent)
    failed = None if exchange.failure is None else exchange.failure.code
    if aggregate:
        return b"".join(exchange.sent), failed, fast.content_events
    # a read of several chunks may go out as the worker framed them or re-framed as one
    # chunk: the client reads the same body either way
    assert exchange.sent[0] == b"<head>"
    client = ChunkedDecoder()
    body = b"".join(client.feed(b"".join(exchange.sent[1:])))
    return body, failed, fast.content_events


@pure_only
@settings(max_examples=300, deadline=None)
@given(st.data(), st.booleans())
def test_the_lane_changes_nothing(data: st.DataObject, aggregate: bool) -> None:
    stream = data.draw(worker_streams(chat=True))
    blocks = [b + b"\n\n" for b in stream.split(b"\n\n") if b]
    if data.draw(st.booleans()):
        # chunk boundaries that do not follow the events: the parser holds partial events
        joined = b"".join(blocks)
        marks = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(joined) - 1)), max_size=6))))
        blocks = [joined[a:b] for a, b in itertools.pairwise([0, *marks, len(joined)]) if joined[a:b]]
    body = b"".join(frame(b) for b in blocks) + b"0\r\n\r\n"
    # mostly one read per chunk (how workers write tokens), sometimes split or merged
    bounds = []
    at = 0
    for b in blocks:
        at += len(frame(b))
        bounds.append(at)
    cuts = sorted(set(data.draw(st.lists(st.sampled_from(bounds or [0]), max_size=len(bounds)))))
    cuts += data.draw(st.lists(st.integers(0, len(body)), max_size=2))
    cuts = sorted(set(cuts))
    with_lane = pumped(body, cuts, lane=True, aggregate=aggregate)
    without = pumped(body, cuts, lane=False, aggregate=aggregate)
    assert with_lane == without


@pure_only
def test_the_lane_is_taken() -> None:
    """Guard for the property above: whole template chunks do go by the lane."""
    texts = ["a", "b", "", "c", "d"]
    blocks = [
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n'
        % orjson.dumps(t)
        for t in texts
    ]
    body = b"".join(frame(b) for b in blocks)
    cuts = []
    at = 0
    for b in blocks:
        at += len(frame(b))
        cuts.append(at)
    fast, _ = translators(chat=True, aggregate=False, include_usage=True)
    exchange = FakeExchange()
    handler = RelayHandler(exchange, [], fast, SSEParser())  # type: ignore[arg-type]
    decoder = ChunkedDecoder()
    taken = 0
    for a, b in itertools.pairwise([0, *cuts]):
        data = body[a:b]
        if decoder.at_boundary and handler.lane and handler.whole_chunks(data) == len(data):
            taken += 1
            continue
        handler.data(b"".join(decoder.feed(data)))
    assert taken == 4  # the first event sets the template, the other four take the lane
    assert b"".join(exchange.sent) == b"<head>" + body
    assert fast.content_events == 4


@pure_only
def test_the_lane_takes_the_template_chunks_of_a_read_of_several() -> None:
    """A worker ahead of its reader: one read carries several token chunks, then [DONE]."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n'
    )
    fast, _ = translators(chat=True, aggregate=False, include_usage=True)
    exchange = FakeExchange()
    handler = RelayHandler(exchange, [], fast, SSEParser())  # type: ignore[arg-type]
    handler.data(event % b'"a"')  # the first event sets the template
    tokens = b"".join(frame(event % orjson.dumps(t)) for t in ["b", "", "c"])
    read = tokens + frame(b"data: [DONE]\n\n")
    assert handler.lane and handler.whole_chunks(read) == len(tokens)
    assert exchange.sent[-1] == tokens  # as the worker framed them, in one write
    assert fast.content_events == 3


@pure_only
def test_a_read_with_a_responses_first_events_and_its_tokens() -> None:
    """An unpaced worker: the role event, the tokens, the finish and [DONE] in one read. The
    first token is decoded the general way (it sets the template); the pump then tries the
    lane again and the tokens after it go by it, whole."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n'
    )
    role = frame(event % (b'{"role":"assistant","content":""}', b"null"))
    tokens = [frame(event % (b'{"content":"%s"}' % t, b"null")) for t in (b"a", b"b", b"c", b"d")]
    finish_event = event % (b"{}", b'"stop"')
    finish = frame(finish_event)
    body = role + b"".join(tokens) + finish + frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    taken: list[int] = []
    original = RelayHandler.whole_chunks

    def counting(self: RelayHandler, data: bytes) -> int:
        n = original(self, data)
        taken.append(n)
        return n

    RelayHandler.whole_chunks = counting  # type: ignore[method-assign]
    writes: list[bytes] = []
    try:
        with_lane = pumped(body, [], lane=True, writes=writes)
    finally:
        RelayHandler.whole_chunks = original  # type: ignore[method-assign]
    assert sum(taken) == len(b"".join(tokens[1:]))
    # role, the first token, the other tokens as they came, then (the template will not take
    # them) the finish and [DONE] joined in one write, and the end: no write per event
    joined = frame(finish_event + b"data: [DONE]\n\n")
    assert writes[1:] == [role, tokens[0], b"".join(tokens[1:]), joined, b"0\r\n\r\n"]
    assert with_lane == pumped(body, [], lane=False)
    assert with_lane[2] == 4


@pure_only
def test_not_while_the_parser_holds_part_of_an_event() -> None:
    """A chunk that is a whole template event, after a chunk that left half an event in the
    parser, belongs to that event: the lane must not take it."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    )
    body = frame(event) + frame(event) + frame(b'data: {"half":') + frame(event)
    cuts = [len(frame(event)), 2 * len(frame(event)), len(body) - len(frame(event))]
    for aggregate in (False, True):
        with_lane = pumped(body, cuts, lane=True, aggregate=aggregate)
        assert with_lane == pumped(body, cuts, lane=False, aggregate=aggregate)


@pure_only
@pytest.mark.parametrize("aggregate", [False, True])
@pytest.mark.parametrize("per_chunk", [False, True])
def test_only_the_first_token_reaches_the_translator(per_chunk: bool, aggregate: bool) -> None:
    """Guard for the property above: after the first token (it sets the template) every
    token chunk goes by the lane, read one by one (taken by the worker connection's own
    check) or all in one read (by the pump's), relaying or aggregating; the client gets
    every token, and an aggregated document has the whole text."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\n\n'
    )
    role_event = event % (b'{"role":"assistant","content":""}', b"null")
    texts = ["a", "b", "", "c\u00e9", "d\n"]
    token_events = [event % (b'{"content":%s}' % orjson.dumps(t), b"null") for t in texts]
    finish_event = event % (b"{}", b'"stop"')
    usage_event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    )
    events = [role_event, *token_events, finish_event, usage_event, b"data: [DONE]\n\n"]
    chunks = [frame(e) for e in events] + [b"0\r\n\r\n"]
    body = b"".join(chunks)
    cuts = list(itertools.accumulate(len(c) for c in chunks))[:-1] if per_chunk else []
    fed: list[bytes] = []
    writes: list[bytes] = []
    answer, failed, content = pumped(
        body, cuts, lane=True, aggregate=aggregate, writes=writes, fed=fed
    )
    assert fed == [role_event, token_events[0], finish_event, usage_event, b"data: [DONE]\n\n"]
    assert failed is None and content == 4
    assert (answer, failed, content) == pumped(body, cuts, lane=False, aggregate=aggregate)
    if aggregate:
        assert answer.startswith(b"<200>")
        document = orjson.loads(answer[len(b"<200>") :])
        assert document["choices"][0]["message"]["content"] == "abc\u00e9d\n"
        assert document["usage"]["completion_tokens"] == 4
    else:
        # every token as it came (the usage event gets its cost)
        assert answer.startswith(b"".join([role_event, *token_events, finish_event]))
        if per_chunk:  # each token chunk written as it came, by itself
            assert writes[3:7] == [frame(e) for e in token_events[1:]]


@pure_only
@pytest.mark.parametrize("aggregate", [False, True])
def test_not_inside_a_chunk_that_holds_what_looks_like_one(aggregate: bool) -> None:
    """A worker chunk whose payload, after a whole event, carries the bytes of a template
    chunk (its size line is an SSE line of an unknown field): read by itself, that part is
    one whole template chunk to look at, but the decoder is inside the outer chunk, so it
    is payload and must go the general way (the lane is armed only between chunks)."""
    event = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}\n\n'
    )
    first, inner = event % b'"a"', frame(event % b'"b"')
    outer = frame(event % b'"x"' + inner)
    body = frame(first) + outer + frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    start = len(frame(first))
    # the outer chunk read in three pieces: its size line and first event, the look-alike,
    # its closing CRLF with the rest
    cut = start + outer.index(inner)
    cuts = [start, cut, cut + len(inner)]
    with_lane = pumped(body, cuts, lane=True, aggregate=aggregate)
    assert with_lane == pumped(body, cuts, lane=False, aggregate=aggregate)
    if not aggregate:
        assert b"\r\n" + event % b'"b"' in with_lane[0]  # the look-alike's size line stays


@pytest.mark.parametrize(
    ("prefix", "suffix", "overlap"),
    [
        (b'data: {"choices":[{"delta":{"content":', b"}}]}\n\n", False),
        (b'data: {"a":"b","content":', b',"c":"d"}\n\n', False),
        # a block can begin with the one and end with the other, with no string between them
        (b'data: {"x":{"y":"b"},"content":', b'},"content":"Z"}]}\n\n', True),
        (b'data: {"x":"","content":', b'","content":"Z"}\n\n', True),
    ],
)
def test_a_template_whose_ends_can_overlap_is_refused(prefix: bytes, suffix: bytes, overlap: bool) -> None:
    """(Its cut of such a block ran backwards: Python's slice gave b"", mypyc's SystemError.)"""
    assert ends_overlap(prefix, suffix) is overlap
