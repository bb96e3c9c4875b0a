"""Where the time of a restore and of the first new token goes (the evidence behind docs/benchmarks.md's
findings; no target of its own).

  - reset() at n_ctx 2048 / 4096 / 8192: llama_memory_clear(data=true), a memset of the whole KV buffer, which
    restore() and load_session() do before handing the state to llama.cpp;
  - restore(bytes) of a 2000-token f16 state at n_ctx 4096 and 8192 (the state is the same size);
  - after a restore (2000 tokens, fresh Context): generate(QUESTION, max_tokens=0) (the question's decode),
    generate(QUESTION, max_tokens=1) (+ logits, sampling and the decode of the sampled token), and one more
    token (generate("", max_tokens=1)), with flash attention off and on.

Run: python bench/breakdown.py [--runs 5]
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import QUESTION, RUNS, THREADS, build_prompt, environment, guarded, summary, timed, write_result
from llama_sessions import Context, Model, default_model_path

N_TOKENS = 2000


def reset_cost(model: Model, n_ctx: int, runs: int) -> dict[str, Any]:
    ctx = Context(model, n_ctx=n_ctx, n_threads=THREADS)
    ctx.reset()
    return summary([guarded(lambda: timed(ctx.reset), f"reset {n_ctx}") for _ in range(runs)])


def first_token(model: Model, n_ctx: int, flash_attn: bool, runs: int) -> dict[str, Any]:
    src = Context(model, n_ctx=n_ctx, n_threads=THREADS, flash_attn=flash_attn)
    src.generate(build_prompt(model, N_TOKENS), max_tokens=0)
    snapshot = src.snapshot()
    del src

    def once() -> tuple[float, float, float, float]:
        ctx = Context(model, n_ctx=n_ctx, n_threads=THREADS, flash_attn=flash_attn)
        restore = timed(lambda: ctx.restore(snapshot))
        question = timed(lambda: ctx.generate(QUESTION, max_tokens=0))
        ctx.restore(snapshot)
        question_and_token = timed(lambda: ctx.generate(QUESTION, max_tokens=1, temperature=0))
        one_more = timed(lambda: ctx.generate("", max_tokens=1, temperature=0))
        return restore, question, question_and_token, one_more

    once()  # warm-up
    rows = [guarded(once, f"first token n_ctx {n_ctx} flash_attn {flash_attn}") for _ in range(runs)]
    names = ("restore", "question_only", "question_and_token", "one_more_token")
    return {name: summary([r[i] for r in rows]) for i, name in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    resets = {str(n): reset_cost(model, n, args.runs) for n in (2048, 4096, 8192)}
    for n, s in resets.items():
        print(f"reset() n_ctx {n}: {s['median'] * 1e3:.1f} ms", flush=True)
    first: dict[str, Any] = {}
    for n_ctx, flash in ((4096, False), (8192, False), (8192, True)):
        key = f"n_ctx {n_ctx}, flash_attn {flash}"
        first[key] = first_token(model, n_ctx, flash, args.runs)
        print(
            f"{key}: " + ", ".join(f"{k} {v['median'] * 1e3:.1f} ms" for k, v in first[key].items()),
            flush=True,
        )
    write_result(
        "breakdown",
        {
            "name": "breakdown",
            "environment": env,
            "config": {"tokens": N_TOKENS, "question": QUESTION, "n_threads": THREADS, "runs": args.runs},
            "reset": resets,
            "first_token": first,
            "targets": [],
        },
    )


if __name__ == "__main__":
    main()
