"""The prefix cache's chunk length: what each length costs and saves, to choose the default.

For each chunk length C, an on-disk PrefixCache receives the chunks of a 2000-token prompt A (the time of
that first call, which decodes A and writes its chunks, is measured against the same call without a cache),
then a fresh Context gets a prompt B, which shares A's first 1792 tokens (another B each run): the time to
its first new token and the prompt tokens it still decodes (B's tokens past the last full shared chunk).
Bytes on disk per cached token show the per-chunk overhead (header, checksum, one file each).

Run: python bench/chunk_length.py [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from _common import THREADS, environment, guarded_time, shared_prefix_prompts, summary, work_dir, write_result
from llama_sessions import Context, Model, PrefixCache, default_model_path

LENGTHS = (64, 128, 256, 512)
SHARED = 1792
TOTAL = 2000
N_CTX = 4096
COMMAND = "python bench/chunk_length.py"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    shared_text, tail_a, tails_b = shared_prefix_prompts(model, SHARED, TOTAL, 1 + args.runs)
    prompt_a = shared_text + tail_a
    prompts_b = [shared_text + tail for tail in tails_b]

    directory = work_dir()

    def fresh(cache: PrefixCache | None) -> Context:
        return Context(model, n_ctx=N_CTX, n_threads=THREADS, prefix_cache=cache)

    # The first call without a cache: what offering chunks adds to it.
    plain = [guarded_time(lambda: fresh(None).generate(prompt_a, max_tokens=0), "plain") for _ in range(2)]
    rows: list[dict[str, Any]] = []
    for length in LENGTHS:
        cache_dir = directory / f"chunks-{length}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache = PrefixCache(cache_dir, chunk_tokens=length)
        first = guarded_time(lambda: fresh(cache).generate(prompt_a, max_tokens=0), f"first {length}")  # noqa: B023
        files = list(cache_dir.glob("*.kvchunk"))
        disk = sum(f.stat().st_size for f in files)
        cached_tokens = len(files) * length
        decoded: list[int] = []
        times: list[float] = []
        for i in range(1 + args.runs):
            ctx = fresh(cache)
            prompt_b = prompts_b[i]
            elapsed = guarded_time(lambda: ctx.generate(prompt_b, max_tokens=1, temperature=0), f"b {length}")  # noqa: B023
            stats = ctx.last_stats
            assert stats is not None
            decoded.append(stats.prompt_tokens)
            if i > 0:
                times.append(elapsed)
        rows.append(
            {
                "chunk_tokens": length,
                "first_call_seconds": first,
                "chunks": len(files),
                "bytes_on_disk": disk,
                "bytes_per_cached_token": disk / cached_tokens,
                "prompt_tokens_decoded": decoded[-1],
                "ttft": summary(times),
            }
        )
        print(
            f"C={length:4d}: first call {first:6.2f} s, {len(files):3d} chunks, "
            f"{disk / cached_tokens:8.0f} B/token, B decodes {decoded[-1]:4d} tokens, "
            f"TTFT {summary(times)['median'] * 1000:7.1f} ms"
        )
    data = {
        "environment": env,
        "command": COMMAND,
        "config": {"shared_tokens": SHARED, "total_tokens": TOTAL, "n_ctx": N_CTX, "runs": args.runs},
        "first_call_without_cache_seconds": min(plain),
        "lengths": rows,
    }
    write_result("chunk_length", data)
    print(f"first call without a cache: {min(plain):.2f} s")


if __name__ == "__main__":
    main()
