"""Generation throughput: one Context vs two Contexts generating at once in two Python threads (2 cores).

Configurations (greedy, 128 tokens after a short prompt, n_ctx 4096):
  one context, n_threads=2;  the same, generating in a thread after the main thread generated (before the
  library ran every decode on its compute threads, libgomp then slept at every barrier: about 1.6x slower);
  one context, n_threads=1;  two contexts over one Model, n_threads=1 each, in parallel threads (the GIL is
  released during native work).
Per-context rate: generated tokens / generation seconds (GenerationStats). Aggregate: all generated tokens /
wall-clock seconds of the whole call(s), short prompt included.

Run: python bench/threads.py [--runs 5]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from _common import GENERATION_PROMPT, GENERATION_TOKENS, RUNS, environment, guarded, median, write_result
from llama_sessions import Context, Model, default_model_path

N_CTX = 4096
COMMAND = "python bench/threads.py"


def generate(ctx: Context) -> tuple[int, float]:
    """Generated tokens and generation seconds of one greedy generation from an empty context."""
    ctx.reset()
    ctx.generate(GENERATION_PROMPT, max_tokens=GENERATION_TOKENS, temperature=0)
    stats = ctx.last_stats
    assert stats is not None
    if stats.generated_tokens != GENERATION_TOKENS:
        raise RuntimeError(f"generated {stats.generated_tokens} tokens ({stats.stop_reason})")
    return stats.generated_tokens, stats.generation_seconds


def run_parallel(contexts: list[Context]) -> tuple[float, list[tuple[int, float]]]:
    """Wall-clock seconds and per-context results of generating in all contexts at once."""
    barrier = threading.Barrier(len(contexts) + 1)
    results: list[tuple[int, float]] = [(0, 0.0)] * len(contexts)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = generate(contexts[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(contexts))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall, results


def bench_config(contexts: list[Context], runs: int, main_first: bool = False) -> dict[str, Any]:
    run_parallel(contexts)  # warm-up
    rows: list[dict[str, Any]] = []
    for _ in range(runs):
        if main_first:
            generate(contexts[0])  # on the main thread, which lives on
        wall, results = guarded(lambda: run_parallel(contexts), f"{len(contexts)} contexts")
        rows.append(
            {
                "wall_seconds": wall,
                "aggregate_tokens_per_second": sum(n for n, _ in results) / wall,
                "per_context_tokens_per_second": [n / s for n, s in results],
            }
        )
    per_context = [r for row in rows for r in row["per_context_tokens_per_second"]]
    return {
        "contexts": len(contexts),
        "n_threads_each": contexts[0].params.n_threads,
        "aggregate_tokens_per_second": median([r["aggregate_tokens_per_second"] for r in rows]),
        "per_context_tokens_per_second": median(per_context),
        "runs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    configs = {
        "one context, n_threads=2": [Context(model, n_ctx=N_CTX, n_threads=2)],
        "one context, n_threads=2, in a thread after the main thread": [
            Context(model, n_ctx=N_CTX, n_threads=2)
        ],
        "one context, n_threads=1": [Context(model, n_ctx=N_CTX, n_threads=1)],
        "two contexts in parallel, n_threads=1 each": [
            Context(model, n_ctx=N_CTX, n_threads=1),
            Context(model, n_ctx=N_CTX, n_threads=1),
        ],
    }
    results = {}
    for name, contexts in configs.items():
        results[name] = bench_config(contexts, args.runs, main_first="after the main" in name)
        r = results[name]
        print(
            f"{name:58s} aggregate {r['aggregate_tokens_per_second']:6.1f} tok/s, "
            f"per context {r['per_context_tokens_per_second']:6.1f} tok/s",
            flush=True,
        )
    write_result(
        "threads",
        {
            "name": "threads",
            "environment": env,
            "config": {
                "n_ctx": N_CTX,
                "prompt": GENERATION_PROMPT,
                "generated_tokens": GENERATION_TOKENS,
                "runs": args.runs,
                "warmup": 1,
            },
            "configs": results,
            "targets": [],
        },
    )


if __name__ == "__main__":
    main()
