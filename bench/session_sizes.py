"""Session size per KV type against the raw KV bytes of the tokens held (docs/session-format.md, "Sizes").

For each KV type, one Context reads the longest prompt; then, longest first, it is truncated to each token
count and a snapshot taken (sizes are exact, so one measurement each). The file save_session writes is checked
to have the snapshot's length. Raw KV bytes = tokens x n_layer x (K row + V row).

Run: python bench/session_sizes.py [--tokens 250 500 ...] [--n-ctx 8192 ...] [--no-json]
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from _common import THREADS, build_prompt, environment, work_dir, write_result
from llama_sessions import Context, Model, default_model_path, inspect_session

TOKENS = (250, 500, 1000, 2000, 4000)
KvType = Literal["f16", "q8_0", "q4_0"]
KV_TYPES: tuple[tuple[KvType, bool], ...] = (("f16", False), ("q8_0", True), ("q4_0", True))
#: Bytes of one K or V row of `width` values.
ROW_BYTES = {
    "f16": lambda width: 2 * width,
    "q8_0": lambda width: width // 32 * 34,
    "q4_0": lambda width: width // 32 * 18,
}
TARGET_OVERHEAD = 0.01
COMMAND = "python bench/session_sizes.py"


def kv_width(model: Model) -> int:
    """Values in one K or V row: n_embd * n_head_kv / n_head."""
    meta = model.metadata
    arch = model.architecture
    return (
        model.n_embd
        * int(meta[f"{arch}.attention.head_count_kv"])
        // int(meta[f"{arch}.attention.head_count"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--n-ctx", type=int, nargs="+", default=[8192])
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    args = parser.parse_args()

    env = environment() if not args.no_json else {}
    model = Model.load(default_model_path())
    width = kv_width(model)
    path = work_dir() / "session_sizes.session"
    rows: list[dict[str, Any]] = []
    print("| KV type | n_ctx | tokens | session file | raw KV bytes | overhead |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for kv, flash in KV_TYPES:
        for n_ctx in args.n_ctx:
            ctx = Context(model, n_ctx=n_ctx, type_k=kv, type_v=kv, flash_attn=flash, n_threads=THREADS)
            longest = max(args.tokens)
            ctx.generate(build_prompt(model, longest), max_tokens=0)
            if ctx.token_count() != longest:
                raise RuntimeError(f"the prompt gave {ctx.token_count()} tokens, expected {longest}")
            for n in sorted(args.tokens, reverse=True):
                ctx.truncate(n)
                snapshot = ctx.snapshot()
                info = inspect_session(snapshot)
                file_bytes = ctx.save_session(path).total_bytes
                if file_bytes != len(snapshot) or path.stat().st_size != len(snapshot):
                    raise RuntimeError("the file and the snapshot differ in size")
                raw = n * model.n_layer * 2 * ROW_BYTES[kv](width)
                row = {
                    "kv_type": kv,
                    "flash_attn": flash,
                    "n_ctx": n_ctx,
                    "tokens": n,
                    "session_bytes": len(snapshot),
                    "header_bytes": info.header_bytes,
                    "state_bytes": info.state_bytes,
                    "raw_kv_bytes": raw,
                    "overhead": len(snapshot) / raw - 1,
                }
                rows.append(row)
                label = f"{kv} (flash_attn)" if flash else kv
                print(
                    f"| {label} | {n_ctx} | {n} | {len(snapshot):,} | {raw:,} | "
                    f"{row['overhead'] * 100:.2f}% |",
                    flush=True,
                )
            del ctx
    path.unlink(missing_ok=True)
    if args.no_json:
        return
    worst = max(rows, key=lambda r: r["overhead"])
    write_result(
        "session_sizes",
        {
            "name": "session_sizes",
            "environment": env,
            "config": {
                "n_layer": model.n_layer,
                "kv_row_values": width,
                "row_bytes": {kv: ROW_BYTES[kv](width) for kv, _ in KV_TYPES},
                "runs": 1,
                "note": "sizes are deterministic: one measurement each",
            },
            "rows": rows,
            "targets": [
                {
                    "name": "session file size above the raw KV bytes (worst case over KV types and sizes)",
                    "measured": f"{worst['overhead'] * 100:.2f}% "
                    f"({worst['kv_type']}, {worst['tokens']} tokens)",
                    "target": f"<= {TARGET_OVERHEAD * 100:.0f}%",
                    "pass": worst["overhead"] <= TARGET_OVERHEAD,
                    "command": COMMAND,
                }
            ],
        },
    )


if __name__ == "__main__":
    main()
