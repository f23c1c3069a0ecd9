"""Write a tiny llama-architecture GGUF model with random weights, for tests.

The model is meant to exercise llama.cpp's llama-server (protocol, framing,
usage, queueing, cancellation), not to say anything sensible: its text is
gibberish. It is written with the llama.cpp tree's own gguf-py (the tree the
server was built from, see build.sh), takes the tokenizer from one of the
tree's vocab-only test files (models/ggml-vocab-phi-3.gguf, a SentencePiece
vocabulary of 32064 tokens) and the chat template that goes with it from
models/templates/ (microsoft-Phi-3.5-mini-instruct.jinja).

Deterministic: the same tree, shape and seed give the same bytes (numpy's
default_rng(seed)). Control and byte tokens get an all-zero output row, so
greedy decoding never picks them: the text is valid UTF-8, generation never
stops by itself (finish_reason is "length" unless a stop string matches), and
streams run as long as max_tokens says.

It must never download anything: everything comes from the tree on disk.

    python make_model.py --tree DIR/vendor/llama.cpp --out model.gguf \
        [--layers 2] [--width 64] [--seed 42]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

VOCAB_FILE = "models/ggml-vocab-phi-3.gguf"
TEMPLATE_FILE = "models/templates/microsoft-Phi-3.5-mini-instruct.jinja"
# gguf token types (llama_token_type): 3 = control, 6 = byte.
_SUPPRESSED_TOKEN_TYPES = (3, 6)


def _import_gguf(tree: Path) -> Any:
    """Import gguf-py from the llama.cpp tree (not from site-packages)."""
    path = str(tree / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def model_file_name(layers: int, width: int, seed: int) -> str:
    """The cache file name for a model of this shape and seed, written by this very script
    (a hash of its source is part of the name, so an edit here never reuses a stale model)."""
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    return f"tiny-llama-L{layers}-W{width}-s{seed}-{digest}.gguf"


def write_model(tree: Path, out: Path, *, layers: int = 2, width: int = 64, seed: int = 42) -> Path:
    """Write the model to `out` (atomically: a temporary file, then a rename)."""
    import numpy as np

    gguf = _import_gguf(tree)
    if width % 16:
        raise ValueError("width must be a multiple of 16")
    n_head = max(1, width // 64) if width >= 128 else 4
    head_dim = width // n_head
    n_ff = 4 * width
    rng = np.random.default_rng(seed)

    vocab = gguf.GGUFReader(str(tree / VOCAB_FILE))
    template = (tree / TEMPLATE_FILE).read_text(encoding="utf-8")
    token_types = np.asarray(vocab.fields["tokenizer.ggml.token_type"].contents(), dtype=np.int32)
    n_vocab = len(token_types)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("sidecar-tiny-llama")
    writer.add_description(
        f"random weights, seed {seed}, {layers} layers, width {width}; for tests only"
    )
    writer.add_context_length(8192)
    writer.add_embedding_length(width)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    for key, field in vocab.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)
    writer.add_chat_template(template)

    def normal(shape: tuple[int, ...], std: float) -> Any:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

    ones = np.ones(width, dtype=np.float32)
    writer.add_tensor("token_embd.weight", normal((n_vocab, width), 1.0))
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        writer.add_tensor(p + "attn_q.weight", normal((width, width), width**-0.5))
        writer.add_tensor(p + "attn_k.weight", normal((width, width), width**-0.5))
        writer.add_tensor(p + "attn_v.weight", normal((width, width), width**-0.5))
        writer.add_tensor(p + "attn_output.weight", normal((width, width), width**-0.5))
        writer.add_tensor(p + "ffn_norm.weight", ones)
        writer.add_tensor(p + "ffn_gate.weight", normal((n_ff, width), width**-0.5))
        writer.add_tensor(p + "ffn_up.weight", normal((n_ff, width), width**-0.5))
        writer.add_tensor(p + "ffn_down.weight", normal((width, n_ff), n_ff**-0.5))
    writer.add_tensor("output_norm.weight", ones)
    # Logits with a standard deviation of about 4: greedy decoding has wide
    # margins, so it does not flip on rounding differences.
    output = normal((n_vocab, width), 4.0 * width**-0.5)
    output[np.isin(token_types, _SUPPRESSED_TOKEN_TYPES)] = 0.0
    writer.add_tensor("output.weight", output)

    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def ensure_model(
    tree: Path, cache_dir: Path, *, layers: int = 2, width: int = 64, seed: int = 42
) -> Path:
    """Return the cached model of this shape and seed, writing it first if missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / model_file_name(layers, width, seed)
    if not out.exists():
        write_model(tree, out, layers=layers, width=width, seed=seed)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: write one model, print its path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tree", type=Path, required=True, help="the llama.cpp tree (…/vendor/llama.cpp)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)
    print(write_model(args.tree, args.out, layers=args.layers, width=args.width, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
