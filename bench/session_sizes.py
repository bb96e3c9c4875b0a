"""Session size per KV type against the raw KV bytes of the tokens held (docs/session-format.md, "Sizes").

Run: python bench/session_sizes.py [--model PATH]
"""

from __future__ import annotations

import argparse

from llama_sessions import Context, Model, default_model_path, inspect_session

TEXT = "The quick brown fox jumps over the lazy dog near the old lighthouse. " * 300
KV_TYPES = (("f16", False), ("q8_0", True), ("q4_0", True))
#: Bytes of one K or V row of `width` values.
ROW_BYTES = {
    "f16": lambda width: 2 * width,
    "q8_0": lambda width: width // 32 * 34,
    "q4_0": lambda width: width // 32 * 18,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="GGUF file (default: the default model)")
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[2048, 4096])
    args = parser.parse_args()
    model = Model.load(args.model or default_model_path())
    # K and V rows hold n_embd_k_gqa values: n_embd * n_head_kv / n_head.
    meta = model.metadata
    arch = model.architecture
    width = (
        model.n_embd
        * int(meta[f"{arch}.attention.head_count_kv"])
        // int(meta[f"{arch}.attention.head_count"])
    )
    tokens = model.tokenize(TEXT)
    print("| KV type | n_ctx | tokens | session file | raw KV bytes | overhead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kv, flash in KV_TYPES:
        for n_ctx in args.n_ctx:
            for n in (100, 1000):
                ctx = Context(model, n_ctx=n_ctx, type_k=kv, type_v=kv, flash_attn=flash)
                ctx.generate(model.detokenize(tokens[:n]), max_tokens=0)
                info = inspect_session(ctx.snapshot())
                raw = ctx.token_count() * model.n_layer * 2 * ROW_BYTES[kv](width)
                label = f"{kv} (flash_attn)" if flash else kv
                print(
                    f"| {label} | {n_ctx} | {ctx.token_count()} | {info.total_bytes:,} | {raw:,} | "
                    f"{(info.total_bytes / raw - 1) * 100:.2f}% |"
                )


if __name__ == "__main__":
    main()
