"""Time to the first new token: re-prefill a system prompt vs load_session vs restore (snapshot bytes).

For each system prompt size, the time until the first new token after the prompt is generated (the target):
prefill the prompt and generate one token, vs load_session or restore and generate one token (a restored
context decodes the prompt's last token once more to get its logits). Then, as a second view, three ways to
get a Context that holds the prompt, each followed by the same question (a few tokens) and one greedy token:
  (a) prefill: generate(system_prompt, max_tokens=0) in a fresh Context;
  (b) load_session(file) in a fresh Context (the file is read once, untimed, just before, so that it is in
      the page cache; "cold" evicts it from the page cache first, with posix_fadvise(DONTNEED));
  (c) restore(snapshot bytes) in a fresh Context.
Context creation is excluded from all three (the Context is created before the timer) and reported
separately. The runs of (a), (b) and (c) are interleaved; the untimed preparation prefill of each size (which
writes the session) is the warm-up of (a).

Run: python bench/restore_vs_prefill.py [--sizes 250 500 ...] [--runs 5] [--prefill-runs 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    QUESTION,
    RUNS,
    THREADS,
    build_prompt,
    environment,
    guarded,
    summary,
    work_dir,
    write_result,
)
from llama_sessions import Context, Model, default_model_path, inspect_session

SIZES = (250, 500, 1000, 2000, 4000)
N_CTX = 8192
TARGET_SIZE = 2000
TARGET_SPEEDUP = 150.0
COMMAND = "python bench/restore_vs_prefill.py"


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Bench:
    def __init__(self, model: Model, n_ctx: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.creation: list[float] = []

    def fresh(self) -> Context:
        start = time.perf_counter()
        ctx = Context(self.model, n_ctx=self.n_ctx, n_threads=THREADS)
        self.creation.append(time.perf_counter() - start)
        return ctx

    def once(self, make_state: Any, expected_tokens: int, before: Any = None) -> tuple[float, float, str]:
        """Seconds until the state is in a fresh Context, seconds for the question + 1 token, the token.
        ``before`` runs untimed after the Context is created."""
        ctx = self.fresh()
        if before is not None:
            before()
        start = time.perf_counter()
        make_state(ctx)
        ready = time.perf_counter()
        answer = ctx.generate(QUESTION, max_tokens=1, temperature=0)
        done = time.perf_counter()
        if ctx.token_count() != expected_tokens:
            raise RuntimeError(f"context holds {ctx.token_count()} tokens, expected {expected_tokens}")
        del ctx
        gc.collect()
        return ready - start, done - ready, answer

    def first_token(self, make_state: Any, expected_tokens: int, before: Any = None) -> tuple[float, str]:
        """Seconds until the first new token after the system prompt is generated (no question), and the
        token. ``make_state`` brings the prompt in *and* generates that token."""
        ctx = self.fresh()
        if before is not None:
            before()
        start = time.perf_counter()
        answer = make_state(ctx)
        done = time.perf_counter()
        if ctx.token_count() != expected_tokens:
            raise RuntimeError(f"context holds {ctx.token_count()} tokens, expected {expected_tokens}")
        del ctx
        gc.collect()
        return done - start, answer


def phases(runs: list[tuple[float, float, str]]) -> dict[str, Any]:
    return {
        "total": summary([a + b for a, b, _ in runs]),
        "state": summary([a for a, _, _ in runs]),
        "question_and_token": summary([b for _, b, _ in runs]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--runs", type=int, default=RUNS, help="timed runs of load_session and restore")
    parser.add_argument("--prefill-runs", type=int, default=RUNS, help="timed runs of the prefill")
    parser.add_argument("--n-ctx", type=int, default=N_CTX)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    bench = Bench(model, args.n_ctx)
    question_tokens = len(model.tokenize(QUESTION, add_bos=False))
    sizes: list[dict[str, Any]] = []
    for n in args.sizes:
        prompt = build_prompt(model, n)
        path = work_dir() / f"restore_vs_prefill_{n}.session"
        expected = n + question_tokens + 1

        # Preparation, untimed: the warm-up of (a); writes the session and the snapshot (b) and (c) use.
        ctx = bench.fresh()
        ctx.generate(prompt, max_tokens=0)
        if ctx.token_count() != n:
            raise RuntimeError(f"the {n}-token prompt gave {ctx.token_count()} tokens")
        ctx.save_session(path)
        snapshot = ctx.snapshot()
        info = inspect_session(snapshot)
        reference = ctx.generate(QUESTION, max_tokens=1, temperature=0)
        del ctx
        gc.collect()

        def prefill(c: Context, prompt: str = prompt) -> None:
            c.generate(prompt, max_tokens=0)

        def load(c: Context, path: Path = path) -> None:
            c.load_session(path)

        def load_cold(c: Context, path: Path = path) -> None:
            drop_from_page_cache(path)
            c.load_session(path)

        def restore(c: Context, snapshot: bytes = snapshot) -> None:
            c.restore(snapshot)

        runs: dict[str, list[tuple[float, float, str]]] = {
            "prefill": [],
            "load": [],
            "load_cold": [],
            "restore": [],
        }
        # The page cache of this VM does not stay warm by itself: a proactive reclaimer (DAMON, "pageout" of
        # memory it sees unused) can evict parts of the file during a long prefill. So the warm load reads
        # the file once, untimed, just before (the cold one evicts it on purpose).
        others = (("load", load, path.read_bytes), ("load_cold", load_cold, None), ("restore", restore, None))
        for _, fn, before in others:
            bench.once(fn, expected, before)  # warm-up
        for i in range(max(args.runs, args.prefill_runs)):
            if i < args.prefill_runs:
                runs["prefill"].append(guarded(partial(bench.once, prefill, expected), f"prefill {n}"))
            if i < args.runs:
                for name, fn, before in others:
                    runs[name].append(guarded(partial(bench.once, fn, expected, before), f"{name} {n}"))

        # Without a question: the first new token right after the system prompt. The prefill computes the
        # logits of the prompt's last token on the way; a restored context decodes that token once more.
        def prefill_token(c: Context, prompt: str = prompt) -> str:
            return c.generate(prompt, max_tokens=1, temperature=0)

        def load_token(c: Context, path: Path = path) -> str:
            c.load_session(path)
            return c.generate("", max_tokens=1, temperature=0)

        def restore_token(c: Context, snapshot: bytes = snapshot) -> str:
            c.restore(snapshot)
            return c.generate("", max_tokens=1, temperature=0)

        firsts: dict[str, list[tuple[float, str]]] = {"prefill": [], "load": [], "restore": []}
        plain = (("load", load_token, path.read_bytes), ("restore", restore_token, None))
        for _, fn, before in plain:
            bench.first_token(fn, n + 1, before)  # warm-up
        for i in range(max(args.runs, args.prefill_runs)):
            if i < args.prefill_runs:
                firsts["prefill"].append(
                    guarded(partial(bench.first_token, prefill_token, n + 1), f"first token prefill {n}")
                )
            if i < args.runs:
                for name, fn, before in plain:
                    firsts[name].append(
                        guarded(partial(bench.first_token, fn, n + 1, before), f"first token {name} {n}")
                    )
        first_answers = {a for rs in firsts.values() for _, a in rs}
        answers = {a for rs in runs.values() for _, _, a in rs}
        entry: dict[str, Any] = {
            "tokens": n,
            "session_bytes": info.total_bytes,
            "state_bytes": info.state_bytes,
            "same_answer_everywhere": answers == {reference},
            **{name: phases(rs) for name, rs in runs.items()},
        }
        entry["first_token"] = {name: summary([t for t, _ in rs]) for name, rs in firsts.items()}
        entry["first_token_same_everywhere"] = len(first_answers) == 1
        first_prefill = entry["first_token"]["prefill"]["median"]
        entry["first_token_speedup_restore"] = first_prefill / entry["first_token"]["restore"]["median"]
        entry["first_token_speedup_load"] = first_prefill / entry["first_token"]["load"]["median"]
        prefill_s = entry["prefill"]["total"]["median"]
        entry["speedup_restore"] = prefill_s / entry["restore"]["total"]["median"]
        entry["speedup_load"] = prefill_s / entry["load"]["total"]["median"]
        entry["speedup_load_cold"] = prefill_s / entry["load_cold"]["total"]["median"]
        sizes.append(entry)
        load_s, restore_s = entry["load"]["total"]["median"], entry["restore"]["total"]["median"]
        print(
            f"{n:5d} tokens: prefill {prefill_s * 1e3:9.1f} ms  load {load_s * 1e3:7.1f} ms  "
            f"restore {restore_s * 1e3:7.1f} ms  "
            f"(x{entry['speedup_restore']:.0f} / x{entry['speedup_load']:.0f})",
            flush=True,
        )
        path.unlink()

    targets = []
    at_target = [s for s in sizes if s["tokens"] == TARGET_SIZE]
    if at_target:
        first = at_target[0]["first_token"]
        speedup = at_target[0]["first_token_speedup_restore"]
        load_speedup = at_target[0]["first_token_speedup_load"]
        targets.append(
            {
                "name": f"restore vs re-prefill, {TARGET_SIZE}-token system prompt (time until the first new "
                "token after it is generated)",
                "measured": f"restore {speedup:.0f}x faster ({first['prefill']['median'] * 1e3:,.0f} vs "
                f"{first['restore']['median'] * 1e3:.1f} ms); load_session {load_speedup:.0f}x",
                "target": f">= {TARGET_SPEEDUP:.0f}x",
                "pass": speedup >= TARGET_SPEEDUP,
                "command": COMMAND,
            }
        )
    write_result(
        "restore_vs_prefill",
        {
            "name": "restore_vs_prefill",
            "environment": env,
            "config": {
                "n_ctx": args.n_ctx,
                "n_threads": THREADS,
                "n_batch": 512,
                "type_k": "f16",
                "type_v": "f16",
                "flash_attn": False,
                "question": QUESTION,
                "question_tokens": question_tokens,
                "generated_tokens": 1,
                "runs": args.runs,
                "prefill_runs": args.prefill_runs,
                "warmup": "1 untimed run of load/load_cold/restore per size; the preparation prefill of each "
                "size is the warm-up of prefill",
            },
            "context_creation": summary(bench.creation),
            "sizes": sizes,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
