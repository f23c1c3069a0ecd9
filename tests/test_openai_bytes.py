"""The exact bytes of the OpenAI dialects' translations, pinned: JSON -> SSE (`sse()`), the
document a non-streaming client gets (`json()`, cost injected), SSE -> JSON (aggregation)
and the request body sent to the worker (`plan`).

Pure. The other tests read these outputs back as JSON; these pin them byte for byte (key
order, escapes, number spellings, what a nesting past orjson's 254 levels does), so a
change made for speed can be shown to change nothing a client or a worker sees. The
expected values were written by the code as it stood before such changes.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest

from sidecar.config import Price, Pricing
from sidecar.dialects import get_dialect
from sidecar.dialects.jsonio import StreamProtocolError
from sidecar.sse import SSEParser

PRICED = Pricing(models={"m": Price(prompt=Decimal("0.10"), completion=Decimal("0.30"),
                                     cached_prompt=Decimal("0.05"))})
STREAM_USAGE = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}'
STREAM_ONLY = b'{"model":"m","messages":[],"stream":true}'
COMPL = b'{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}'

DOCUMENTS = {
    "plain": ("openai-chat", STREAM_USAGE,
        b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m",'
        b'"system_fingerprint":"fp_1","choices":[{"index":0,"message":{"role":"assistant",'
        b'"content":"Hello!"},"logprobs":null,"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}}'),
    "two_choices_tools_logprobs": ("openai-chat", STREAM_USAGE,
        b'{"id":"c2","object":"chat.completion","created":5,"model":"m","choices":['
        b'{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function",'
        b'"function":{"name":"f","arguments":"{\\"a\\": 1}"}},{"id":"t2","type":"function","function":{"name":"g","arguments":"{}"}}]},'
        b'"logprobs":{"content":[{"token":"a","logprob":-0.5,"top_logprobs":[]}]},"finish_reason":"tool_calls","stop_reason":null},'
        b'{"index":1,"message":{"role":"assistant","content":"B","refusal":null},"logprobs":null,"finish_reason":"length","stop_reason":128009}],'
        b'"usage":{"prompt_tokens":20,"completion_tokens":7,"total_tokens":27,"prompt_tokens_details":{"cached_tokens":4}}}'),
    "no_usage_unicode": ("openai-chat", STREAM_USAGE,
        '{"id":"c3","object":"chat.completion","created":6,"model":"m","choices":[{"index":0,'
        '"message":{"role":"assistant","content":"h\u00e9llo \u4e16\u754c \U0001F600 \\u00e9 \\n\\"q\\"",'
        '"reasoning_content":"thought \u2028"},"finish_reason":"stop"}]}'.encode()),
    "client_did_not_ask_usage": ("openai-chat", STREAM_ONLY,
        b'{"id":"c4","object":"chat.completion","created":7,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'),
    "missing_identity_no_index": ("openai-chat", STREAM_USAGE,
        b'{"created":0,"choices":[{"message":{"content":"a","role":"tool"},"finish_reason":"stop"},'
        b'{"message":{"content":"b"}},"junk",{"message":"no object"}],"usage":{"prompt_tokens":3}}'),
    "surrogate_and_big_int": ("openai-chat", STREAM_USAGE,
        b'{"id":"c5","object":"chat.completion","created":8,"model":"m","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"half \\ud83d end","tool_calls":[{"id":"t","type":"function",'
        b'"function":{"name":"f","arguments":"{}"},"seed":123456789012345678901234}, "not a dict"]},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}'),
    "pretty_printed": ("openai-chat", STREAM_USAGE,
        b'{\n  "id": "c6",\n  "object": "chat.completion",\n  "created": 9,\n  "model": "m",\n'
        b'  "choices": [ { "index": 0, "message": { "role": "assistant", "content": "x" },'
        b' "finish_reason": "stop" } ],\n  "usage": { "prompt_tokens": 1e0, "completion_tokens": 1 },\n'
        b'  "extra_top": {"nested": [1, 2.50, true]}\n}\n'),
    "completions_two_choices": ("openai-completions", COMPL,
        b'{"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":['
        b'{"index":0,"text":"He","logprobs":{"tokens":["H","e"],"token_logprobs":[-1.0,-2.0],"top_logprobs":null,"text_offset":[0,1]},"finish_reason":"stop"},'
        b'{"index":1,"text":"llo","logprobs":null,"finish_reason":"length"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}'),
    "completions_no_text": ("openai-completions", COMPL,
        b'{"id":"cmpl-2","object":"text_completion","created":11,"model":"m","choices":[{"index":0,"finish_reason":"stop"}]}'),
    "worker_error": ("openai-chat", STREAM_USAGE,
        b'{"error":{"message":"bad","type":"x","code":1}}'),
    "worker_error_string": ("openai-chat", STREAM_USAGE,
        b'{"error":"Request failed during generation: boom","error_type":"generation"}'),
}

PLANS = {
    "stream_usage": STREAM_USAGE,
    "stream_only": STREAM_ONLY,
    "stream_options_other": b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true}}',
    "no_stream": b'{"model":"m","messages":[{"role":"user","content":"hi \\u00e9 \xc3\xa9"}],"max_tokens":64}',
    "stream_false": b'{"model":"m","stream":false,"stream_options":{"include_usage":true}}',
    "stream_null": b'{"stream":null,"model":7}',
    "pretty": b'{ "model" : "m" , "stream" : true , "x": 1.50, "y": 1e3 }',
    "big_int": b'{"model":"m","stream":true,"seed":123456789012345678901234}',
    "unicode_keys": '{"mod\u00e9l":"\U0001F600","stream":true,"stream_options":{}}'.encode(),
}
MODES = ("auto", "always", "never")

_B = '{"id":"s1","object":"chat.completion.chunk","created":12,"model":"m","choices":'
STREAMS = {
    "chat_two_choices_tools": ("openai-chat", b"".join(
        ("data: " + _B + c + "}\n\n").encode() for c in [
            '[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]',
            '[{"index":0,"delta":{"content":"He"},"logprobs":{"content":[{"token":"He","logprob":-1.0}]},"finish_reason":null}]',
            '[{"index":1,"delta":{"role":"assistant","tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{\\"a"}}]},"finish_reason":null}]',
            '[{"index":0,"delta":{"content":"llo \u00e9\U0001F600"},"logprobs":{"content":[{"token":"llo","logprob":-2.0}]},"finish_reason":null}]',
            '[{"index":1,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\\": 1}"}}]},"finish_reason":null}]',
            '[{"index":0,"delta":{},"finish_reason":"stop"}]',
            '[{"index":1,"delta":{},"finish_reason":"tool_calls","stop_reason":null}]',
            '[],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13}',
        ]) + b"data: [DONE]\n\n"),
    "chat_no_usage_template": ("openai-chat", b"".join(
        ("data: " + _B + '[{"index":0,"delta":{"content":"' + t + '"},"finish_reason":null}]}\n\n').encode()
        for t in ["a", "b", "c", "d", "\\u00e9", "f"]) + b'data: ' + (_B + '[{"index":0,"delta":{},"finish_reason":"length"}]}').encode() + b"\n\ndata: [DONE]\n\n"),
    "completions": ("openai-completions", b"".join(
        ("data: " + c + "\n\n").encode() for c in [
            '{"id":"cmpl-s","object":"text_completion","created":13,"model":"m","choices":[{"index":0,"text":"He","logprobs":{"tokens":["He"],"token_logprobs":[-1.0],"top_logprobs":null,"text_offset":[0]},"finish_reason":null}]}',
            '{"id":"cmpl-s","object":"text_completion","created":13,"model":"m","choices":[{"index":0,"text":"llo","logprobs":{"tokens":["llo"],"token_logprobs":[-0.5],"top_logprobs":null,"text_offset":[2]},"finish_reason":"stop"}],"system_fingerprint":"fp"}',
            '{"id":"cmpl-s","object":"text_completion","created":13,"model":"m","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}',
        ]) + b"data: [DONE]\n\n"),
}

def deep_document(depth: int, where: str) -> bytes:
    """A chat document with one value nested `depth` lists deep (orjson writes 254 levels) in
    the message, the usage, a choice's extra key or the document's extra key."""
    deep = b"[" * depth + b"]" * depth
    at = {k: (deep if k == where else b"1") for k in ("message", "usage", "choice", "top")}
    return (b'{"id":"d","object":"chat.completion","created":1,"model":"m","top":' + at["top"]
            + b',"choices":[{"index":0,"message":{"role":"assistant","content":"x","deep":'
            + at["message"] + b'},"finish_reason":"stop","extra":' + at["choice"]
            + b'}],"usage":{"prompt_tokens":1,"completion_tokens":1,"nest":' + at["usage"] + b'}}')

DEPTHS = range(248, 256)
WHERE = ("message", "usage", "choice", "top")


DOCUMENT_BYTES = {
    'plain': (
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hello!"},"logprobs":null,"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14,"cost":0.000002}}\n\ndata: [DONE]\n\n',
        b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m","system_fingerprint":"fp_1","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14,"cost":0.000002}}',
        '0.00000200',
    ),
    'two_choices_tools_logprobs': (
        b'data: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{"content":null,"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"f","arguments":"{\\"a\\": 1}"}},{"index":1,"id":"t2","type":"function","function":{"name":"g","arguments":"{}"}}]},"logprobs":{"content":[{"token":"a","logprob":-0.5,"top_logprobs":[]}]},"finish_reason":null}]}\n\ndata: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls","stop_reason":null}]}\n\ndata: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":1,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":1,"delta":{"content":"B","refusal":null},"logprobs":null,"finish_reason":null}]}\n\ndata: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[{"index":1,"delta":{},"finish_reason":"length","stop_reason":128009}]}\n\ndata: {"id":"c2","object":"chat.completion.chunk","created":5,"model":"m","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":7,"total_tokens":27,"prompt_tokens_details":{"cached_tokens":4},"cost":0.0000039}}\n\ndata: [DONE]\n\n',
        b'{"id":"c2","object":"chat.completion","created":5,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t1","type":"function","function":{"name":"f","arguments":"{\\"a\\": 1}"}},{"id":"t2","type":"function","function":{"name":"g","arguments":"{}"}}]},"logprobs":{"content":[{"token":"a","logprob":-0.5,"top_logprobs":[]}]},"finish_reason":"tool_calls","stop_reason":null},{"index":1,"message":{"role":"assistant","content":"B","refusal":null},"logprobs":null,"finish_reason":"length","stop_reason":128009}],"usage":{"prompt_tokens":20,"completion_tokens":7,"total_tokens":27,"prompt_tokens_details":{"cached_tokens":4},"cost":0.0000039}}',
        '0.00000390',
    ),
    'no_usage_unicode': (
        b'data: {"id":"c3","object":"chat.completion.chunk","created":6,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"c3","object":"chat.completion.chunk","created":6,"model":"m","choices":[{"index":0,"delta":{"content":"h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x98\x80 \xc3\xa9 \\n\\"q\\"","reasoning_content":"thought \xe2\x80\xa8"},"finish_reason":null}]}\n\ndata: {"id":"c3","object":"chat.completion.chunk","created":6,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
        b'{"id":"c3","object":"chat.completion","created":6,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x98\x80 \xc3\xa9 \\n\\"q\\"","reasoning_content":"thought \xe2\x80\xa8"},"finish_reason":"stop"}]}',
        'None',
    ),
    'client_did_not_ask_usage': (
        b'data: {"id":"c4","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"c4","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\ndata: {"id":"c4","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
        b'{"id":"c4","object":"chat.completion","created":7,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2,"cost":0.0000004}}',
        '4.0E-7',
    ),
    'missing_identity_no_index': (
        b'data: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"role":"tool"},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":1,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":1,"delta":{"content":"b"},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":1,"delta":{},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":3,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":3,"delta":{},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":3,"delta":{},"finish_reason":null}]}\n\ndata: {"id":"chatcmpl-rid","object":"chat.completion.chunk","created":0,"model":"m","choices":[],"usage":{"prompt_tokens":3,"cost":0.0000003}}\n\ndata: [DONE]\n\n',
        b'{"created":0,"choices":[{"message":{"content":"a","role":"tool"},"finish_reason":"stop"},{"message":{"content":"b"}},"junk",{"message":"no object"}],"usage":{"prompt_tokens":3,"cost":0.0000003}}',
        '3.0E-7',
    ),
    'surrogate_and_big_int': (
        b'data: {"id":"c5","object":"chat.completion.chunk","created":8,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"c5","object":"chat.completion.chunk","created":8,"model":"m","choices":[{"index":0,"delta":{"content":"half \xef\xbf\xbd end","tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":"{}"},"seed":123456789012345678901234},"not a dict"]},"finish_reason":null}]}\n\ndata: {"id":"c5","object":"chat.completion.chunk","created":8,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: {"id":"c5","object":"chat.completion.chunk","created":8,"model":"m","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4,"cost":0.0000008}}\n\ndata: [DONE]\n\n',
        b'{"id":"c5","object":"chat.completion","created":8,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"half \xef\xbf\xbd end","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"},"seed":123456789012345678901234},"not a dict"]},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4,"cost":0.0000008}}',
        '8.0E-7',
    ),
    'pretty_printed': (
        b'data: {"id":"c6","object":"chat.completion.chunk","created":9,"model":"m","extra_top":{"nested":[1,2.5,true]},"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\ndata: {"id":"c6","object":"chat.completion.chunk","created":9,"model":"m","extra_top":{"nested":[1,2.5,true]},"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\ndata: {"id":"c6","object":"chat.completion.chunk","created":9,"model":"m","extra_top":{"nested":[1,2.5,true]},"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: {"id":"c6","object":"chat.completion.chunk","created":9,"model":"m","extra_top":{"nested":[1,2.5,true]},"choices":[],"usage":{"prompt_tokens":1.0,"completion_tokens":1,"cost":0.0000003}}\n\ndata: [DONE]\n\n',
        b'{"id":"c6","object":"chat.completion","created":9,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1.0,"completion_tokens":1,"cost":0.0000003},"extra_top":{"nested":[1,2.5,true]}}',
        '3.0E-7',
    ),
    'completions_two_choices': (
        b'data: {"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":[{"index":0,"text":"He","logprobs":{"tokens":["H","e"],"token_logprobs":[-1.0,-2.0],"top_logprobs":null,"text_offset":[0,1]},"finish_reason":null}]}\n\ndata: {"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":[{"index":0,"text":"","finish_reason":"stop"}]}\n\ndata: {"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":[{"index":1,"text":"llo","logprobs":null,"finish_reason":null}]}\n\ndata: {"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":[{"index":1,"text":"","finish_reason":"length"}]}\n\ndata: {"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10,"cost":0.000002}}\n\ndata: [DONE]\n\n',
        b'{"id":"cmpl-1","object":"text_completion","created":10,"model":"m","choices":[{"index":0,"text":"He","logprobs":{"tokens":["H","e"],"token_logprobs":[-1.0,-2.0],"top_logprobs":null,"text_offset":[0,1]},"finish_reason":"stop"},{"index":1,"text":"llo","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10,"cost":0.000002}}',
        '0.00000200',
    ),
    'completions_no_text': (
        b'data: {"id":"cmpl-2","object":"text_completion","created":11,"model":"m","choices":[{"index":0,"text":"","finish_reason":null}]}\n\ndata: {"id":"cmpl-2","object":"text_completion","created":11,"model":"m","choices":[{"index":0,"text":"","finish_reason":"stop"}]}\n\ndata: [DONE]\n\n',
        b'{"id":"cmpl-2","object":"text_completion","created":11,"model":"m","choices":[{"index":0,"finish_reason":"stop"}]}',
        'None',
    ),
    'worker_error': (
        b'data: {"error":{"message":"bad","type":"x","code":1}}\n\n',
        b'{"error":{"message":"bad","type":"x","code":1}}',
        'None',
    ),
    'worker_error_string': (
        b'data: {"error":"Request failed during generation: boom","error_type":"generation"}\n\n',
        b'{"error":{"message":"Request failed during generation: boom","type":"upstream_error","code":"generation"}}',
        'None',
    ),
}
PLAN_BYTES = {
    ('stream_usage', 'auto', 'openai-chat'): (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}', True, True, True, 'm'),
    ('stream_usage', 'auto', 'openai-completions'): (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}', True, True, True, 'm'),
    ('stream_usage', 'always', 'openai-chat'): (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}', True, True, True, 'm'),
    ('stream_usage', 'always', 'openai-completions'): (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}', True, True, True, 'm'),
    ('stream_usage', 'never', 'openai-chat'): (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}', True, True, False, 'm'),
    ('stream_usage', 'never', 'openai-completions'): (b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":false}', True, True, False, 'm'),
    ('stream_only', 'auto', 'openai-chat'): (b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('stream_only', 'auto', 'openai-completions'): (b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('stream_only', 'always', 'openai-chat'): (b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('stream_only', 'always', 'openai-completions'): (b'{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('stream_only', 'never', 'openai-chat'): (b'{"model":"m","messages":[],"stream":false}', True, False, False, 'm'),
    ('stream_only', 'never', 'openai-completions'): (b'{"model":"m","messages":[],"stream":false}', True, False, False, 'm'),
    ('stream_options_other', 'auto', 'openai-chat'): (b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}', True, False, True, 'm'),
    ('stream_options_other', 'auto', 'openai-completions'): (b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}', True, False, True, 'm'),
    ('stream_options_other', 'always', 'openai-chat'): (b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}', True, False, True, 'm'),
    ('stream_options_other', 'always', 'openai-completions'): (b'{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true,"include_usage":true}}', True, False, True, 'm'),
    ('stream_options_other', 'never', 'openai-chat'): (b'{"model":"m","stream":false}', True, False, False, 'm'),
    ('stream_options_other', 'never', 'openai-completions'): (b'{"model":"m","stream":false}', True, False, False, 'm'),
    ('no_stream', 'auto', 'openai-chat'): (b'{"model":"m","messages":[{"role":"user","content":"hi \\u00e9 \xc3\xa9"}],"max_tokens":64}', False, False, False, 'm'),
    ('no_stream', 'auto', 'openai-completions'): (b'{"model":"m","messages":[{"role":"user","content":"hi \\u00e9 \xc3\xa9"}],"max_tokens":64}', False, False, False, 'm'),
    ('no_stream', 'always', 'openai-chat'): (b'{"model":"m","messages":[{"role":"user","content":"hi \xc3\xa9 \xc3\xa9"}],"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}', False, False, True, 'm'),
    ('no_stream', 'always', 'openai-completions'): (b'{"model":"m","messages":[{"role":"user","content":"hi \xc3\xa9 \xc3\xa9"}],"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}', False, False, True, 'm'),
    ('no_stream', 'never', 'openai-chat'): (b'{"model":"m","messages":[{"role":"user","content":"hi \xc3\xa9 \xc3\xa9"}],"max_tokens":64,"stream":false}', False, False, False, 'm'),
    ('no_stream', 'never', 'openai-completions'): (b'{"model":"m","messages":[{"role":"user","content":"hi \xc3\xa9 \xc3\xa9"}],"max_tokens":64,"stream":false}', False, False, False, 'm'),
    ('stream_false', 'auto', 'openai-chat'): (b'{"model":"m","stream":false}', False, False, False, 'm'),
    ('stream_false', 'auto', 'openai-completions'): (b'{"model":"m","stream":false}', False, False, False, 'm'),
    ('stream_false', 'always', 'openai-chat'): (b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', False, False, True, 'm'),
    ('stream_false', 'always', 'openai-completions'): (b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}', False, False, True, 'm'),
    ('stream_false', 'never', 'openai-chat'): (b'{"model":"m","stream":false}', False, False, False, 'm'),
    ('stream_false', 'never', 'openai-completions'): (b'{"model":"m","stream":false}', False, False, False, 'm'),
    ('stream_null', 'auto', 'openai-chat'): (b'{"stream":false,"model":7}', False, False, False, None),
    ('stream_null', 'auto', 'openai-completions'): (b'{"stream":false,"model":7}', False, False, False, None),
    ('stream_null', 'always', 'openai-chat'): (b'{"stream":true,"model":7,"stream_options":{"include_usage":true}}', False, False, True, None),
    ('stream_null', 'always', 'openai-completions'): (b'{"stream":true,"model":7,"stream_options":{"include_usage":true}}', False, False, True, None),
    ('stream_null', 'never', 'openai-chat'): (b'{"stream":false,"model":7}', False, False, False, None),
    ('stream_null', 'never', 'openai-completions'): (b'{"stream":false,"model":7}', False, False, False, None),
    ('pretty', 'auto', 'openai-chat'): (b'{"model":"m","stream":true,"x":1.5,"y":1000.0,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('pretty', 'auto', 'openai-completions'): (b'{"model":"m","stream":true,"x":1.5,"y":1000.0,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('pretty', 'always', 'openai-chat'): (b'{"model":"m","stream":true,"x":1.5,"y":1000.0,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('pretty', 'always', 'openai-completions'): (b'{"model":"m","stream":true,"x":1.5,"y":1000.0,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('pretty', 'never', 'openai-chat'): (b'{"model":"m","stream":false,"x":1.5,"y":1000.0}', True, False, False, 'm'),
    ('pretty', 'never', 'openai-completions'): (b'{"model":"m","stream":false,"x":1.5,"y":1000.0}', True, False, False, 'm'),
    ('big_int', 'auto', 'openai-chat'): (b'{"model":"m","stream":true,"seed":123456789012345678901234,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('big_int', 'auto', 'openai-completions'): (b'{"model":"m","stream":true,"seed":123456789012345678901234,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('big_int', 'always', 'openai-chat'): (b'{"model":"m","stream":true,"seed":123456789012345678901234,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('big_int', 'always', 'openai-completions'): (b'{"model":"m","stream":true,"seed":123456789012345678901234,"stream_options":{"include_usage":true}}', True, False, True, 'm'),
    ('big_int', 'never', 'openai-chat'): (b'{"model":"m","stream":false,"seed":123456789012345678901234}', True, False, False, 'm'),
    ('big_int', 'never', 'openai-completions'): (b'{"model":"m","stream":false,"seed":123456789012345678901234}', True, False, False, 'm'),
    ('unicode_keys', 'auto', 'openai-chat'): (b'{"mod\xc3\xa9l":"\xf0\x9f\x98\x80","stream":true,"stream_options":{"include_usage":true}}', True, False, True, None),
    ('unicode_keys', 'auto', 'openai-completions'): (b'{"mod\xc3\xa9l":"\xf0\x9f\x98\x80","stream":true,"stream_options":{"include_usage":true}}', True, False, True, None),
    ('unicode_keys', 'always', 'openai-chat'): (b'{"mod\xc3\xa9l":"\xf0\x9f\x98\x80","stream":true,"stream_options":{"include_usage":true}}', True, False, True, None),
    ('unicode_keys', 'always', 'openai-completions'): (b'{"mod\xc3\xa9l":"\xf0\x9f\x98\x80","stream":true,"stream_options":{"include_usage":true}}', True, False, True, None),
    ('unicode_keys', 'never', 'openai-chat'): (b'{"mod\xc3\xa9l":"\xf0\x9f\x98\x80","stream":false}', True, False, False, None),
    ('unicode_keys', 'never', 'openai-completions'): (b'{"mod\xc3\xa9l":"\xf0\x9f\x98\x80","stream":false}', True, False, False, None),
}
AGGREGATED_BYTES = {
    'chat_two_choices_tools': b'{"id":"s1","object":"chat.completion","created":12,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello \xc3\xa9\xf0\x9f\x98\x80"},"finish_reason":"stop","logprobs":{"content":[{"token":"He","logprob":-1.0},{"token":"llo","logprob":-2.0}]}},{"index":1,"message":{"role":"assistant","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{\\"a\\": 1}"}}],"content":null},"finish_reason":"tool_calls","stop_reason":null}],"usage":{"prompt_tokens":9,"completion_tokens":4,"total_tokens":13,"cost":0.0000021}}',
    'chat_no_usage_template': b'{"id":"s1","object":"chat.completion","created":12,"model":"m","choices":[{"index":0,"message":{"content":"abcd\xc3\xa9f","role":"assistant"},"finish_reason":"length"}]}',
    'completions': b'{"id":"cmpl-s","object":"text_completion","created":13,"model":"m","choices":[{"index":0,"text":"Hello","logprobs":{"tokens":["He","llo"],"token_logprobs":[-1.0,-0.5],"top_logprobs":null,"text_offset":[0,2]},"finish_reason":"stop"}],"system_fingerprint":"fp","usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4,"cost":0.0000008}}',
}
DEEP_OUTCOMES = {
    ('message', 248): ('da8d78dc683637bc', '29d6cf0020b23b1d'),
    ('message', 249): ('3698a83d118164b0', '9615cd1babadd59b'),
    ('message', 250): ('b7813a8810cbcec2', 'a624313d0ea23f6a'),
    ('message', 251): ('error', 'error'),
    ('message', 252): ('error', 'error'),
    ('message', 253): ('error', 'error'),
    ('message', 254): ('error', 'error'),
    ('message', 255): ('error', 'error'),
    ('usage', 248): ('6be464b0829a8649', '1a8a5ebab00a0911'),
    ('usage', 249): ('76294034fb63fbd6', 'd8e23f4fc31bd1f3'),
    ('usage', 250): ('817cfe6a8ab6114e', 'dabedb43e05ca314'),
    ('usage', 251): ('bdc2b6c7b03c1076', 'b755fdcae9f77e1c'),
    ('usage', 252): ('ad140a276918f688', '2aca27f50638725c'),
    ('usage', 253): ('error', 'error'),
    ('usage', 254): ('error', 'error'),
    ('usage', 255): ('error', 'error'),
    ('choice', 248): ('e80014a3c8bf6231', 'ea3eb7254285c81a'),
    ('choice', 249): ('e2f68296c26d53e9', '9682d198a66c2174'),
    ('choice', 250): ('0bb6918708079b24', '5c89ae87e42c9858'),
    ('choice', 251): ('06b1b561c42c694d', '5a9c065cde1663e6'),
    ('choice', 252): ('error', 'error'),
    ('choice', 253): ('error', 'error'),
    ('choice', 254): ('error', 'error'),
    ('choice', 255): ('error', 'error'),
    ('top', 248): ('24bc8ec2e15b49e5', 'afcb75049e545b6d'),
    ('top', 249): ('2a893979090771d9', '7c43fff52c61fce0'),
    ('top', 250): ('8a6ebb09aca3bf3d', '382947cbc699227e'),
    ('top', 251): ('4d6fe5e7f41cc59e', '57cec5f4766239ed'),
    ('top', 252): ('390f6ef9248ed806', '25391653ebc2db38'),
    ('top', 253): ('255b3462ebf45dad', 'c181c15eb53fcaf2'),
    ('top', 254): ('error', 'error'),
    ('top', 255): ('error', 'error'),
}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_a_worker_document_is_replayed_and_answered_byte_for_byte(name: str) -> None:
    dialect, request, body = DOCUMENTS[name]
    d = get_dialect(dialect)
    plan = d.plan(request, "never", "rid")
    plan.created = 1234
    translator = d.document(plan, PRICED, body)
    sse, json, cost = DOCUMENT_BYTES[name]
    assert translator.sse() == sse
    assert translator.json() == json
    assert str(translator.cost) == cost


@pytest.mark.parametrize("key", PLAN_BYTES)
def test_the_body_sent_to_the_worker_is_pinned(key: tuple[str, str, str]) -> None:
    name, mode, dialect = key
    try:
        p = get_dialect(dialect).plan(PLANS[name], mode, "rid")
    except Exception as exc:  # a refusal is pinned too
        assert repr(exc) == PLAN_BYTES[key]
        return
    assert (p.body, p.client_stream, p.include_usage, p.asked_stream, p.request_model) == (
        PLAN_BYTES[key]
    )


@pytest.mark.parametrize("name", STREAMS)
def test_an_aggregated_stream_is_pinned(name: str) -> None:
    dialect, data = STREAMS[name]
    d = get_dialect(dialect)
    plan = d.plan(b'{"model":"m"}', "always", "rid")
    plan.created = 1234
    translator = d.stream(plan, PRICED, aggregate=True)
    for event in SSEParser().feed(data):
        assert translator.feed(event) is None
    assert translator.document() == AGGREGATED_BYTES[name]


@pytest.mark.parametrize("key", DEEP_OUTCOMES)
def test_nesting_near_the_writers_limit_is_written_or_refused_as_before(key: tuple[str, int]) -> None:
    where, depth = key
    d = get_dialect("openai-chat")
    outcomes = []
    for what in ("sse", "json"):
        try:
            t = d.document(d.plan(STREAM_USAGE, "never", "rid"), PRICED, deep_document(depth, where))
            outcomes.append(hashlib.sha256(getattr(t, what)()).hexdigest()[:16])
        except StreamProtocolError:
            outcomes.append("error")
    assert tuple(outcomes) == DEEP_OUTCOMES[key]
