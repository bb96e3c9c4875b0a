"""Peak memory of save_session and load_session above the process baseline (model + context + state).

Each measurement runs in a fresh process (``--child save|load``): it loads the model and creates the Context
(n_ctx 4096, f16); the save child also prefills the 2000-token prompt. Then it resets the RSS high-water mark
(/proc/self/clear_refs), reads VmRSS (the baseline), runs the one operation and reads VmHWM (the peak). The
session file is in the page cache, which is not part of a process's RSS.

Run: python bench/memory.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    RUNS,
    THREADS,
    build_prompt,
    environment,
    measure_peak,
    median,
    run_json,
    work_dir,
    write_result,
)

N_TOKENS = 2000
N_CTX = 4096
TARGET_RATIO = 1.2
COMMAND = "python bench/memory.py"


def child(op: str, path: Path) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from llama_sessions import Context, Model, default_model_path, inspect_session

    model = Model.load(default_model_path())
    ctx = Context(model, n_ctx=N_CTX, n_threads=THREADS)
    if op == "save":
        ctx.generate(build_prompt(model, N_TOKENS), max_tokens=0)
        start = time.perf_counter()
        result: dict[str, Any] = dict(measure_peak(lambda: ctx.save_session(path)))
    else:
        start = time.perf_counter()
        result = dict(measure_peak(lambda: ctx.load_session(path)))
        if ctx.token_count() != N_TOKENS:
            raise RuntimeError(f"loaded {ctx.token_count()} tokens")
    result["seconds"] = time.perf_counter() - start
    info = inspect_session(path)
    result["session_bytes"] = info.total_bytes
    result["state_bytes"] = info.state_bytes
    result["ratio_to_session"] = result["peak_above_baseline"] / info.total_bytes
    return result


def measure(op: str, path: Path, runs: int) -> dict[str, Any]:
    """``runs`` fresh child processes of ``op``; the median and every run."""
    results = [
        run_json([sys.executable, str(Path(__file__)), "--child", op, "--session", str(path)])
        for _ in range(runs)
    ]
    return {
        "peak_above_baseline_median": median([r["peak_above_baseline"] for r in results]),
        "ratio_to_session_median": median([r["ratio_to_session"] for r in results]),
        "session_bytes": results[0]["session_bytes"],
        "baseline_rss_median": median([r["baseline_rss"] for r in results]),
        "runs": results,
    }


def measure_ours(runs: int) -> dict[str, Any]:
    """Save children first (they write the file the load children read)."""
    path = work_dir() / "memory.session"
    out = {"save": measure("save", path, runs), "load": measure("load", path, runs)}
    path.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--child", choices=["save", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--session", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.session)))
        return

    env = environment()
    ours = measure_ours(args.runs)
    targets = []
    for op in ("save", "load"):
        m = ours[op]
        ratio = m["ratio_to_session_median"]
        print(
            f"{op}: peak {m['peak_above_baseline_median'] / 1e6:.1f} MB above baseline = "
            f"{ratio:.2f}x the session"
        )
        targets.append(
            {
                "name": f"peak memory of {op}_session above the baseline (model + context), "
                f"{N_TOKENS} tokens f16",
                "measured": f"{ratio:.2f}x the state size "
                f"({m['peak_above_baseline_median'] / 1e6:.1f} MB for {m['session_bytes'] / 1e6:.1f} MB)",
                "target": f"<= {TARGET_RATIO}x",
                "pass": ratio <= TARGET_RATIO,
                "command": COMMAND,
            }
        )
    write_result(
        "memory",
        {
            "name": "memory",
            "environment": env,
            "config": {
                "tokens": N_TOKENS,
                "n_ctx": N_CTX,
                "type_k": "f16",
                "type_v": "f16",
                "runs": args.runs,
                "method": "fresh process per run; VmHWM after the operation minus VmRSS before it, with the "
                "high-water mark reset by /proc/self/clear_refs just before",
            },
            **ours,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
