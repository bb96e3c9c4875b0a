"""llama.cpp's own batch gain on this machine, the ceiling of the batching benchmark (section 10): the
median time of one decode step in which each of 1, 2, 4, 8 and 16 sequences adds one token, with llama.cpp's
API alone (`rust/core/examples/batch_scaling.rs`: split KV, flash attention off, 2 threads, the counts
taking turns), after 200 tokens per sequence and after 450 (the length the benchmark's chats reach). Run
with the test model (Q4_1) and with copies of it requantized to Q8_0 and Q4_0 (bench/requantize.py, cached
in the bench work directory), the types llama.cpp has batched x86 kernels for.

Run: python bench/batch_ceiling.py [--types Q4_1,Q8_0,Q4_0] [--lengths 200,450]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import BENCH_DIR, ROOT, environment, work_dir, write_result
from llama_sessions import default_model_path

COMMAND = "python bench/batch_ceiling.py"
CARGO_RUN = [
    "cargo",
    "run",
    "--quiet",
    "--release",
    "--locked",
    "-p",
    "llama-sessions",
    "--example",
    "batch_scaling",
    "--",
]
LINE = re.compile(
    r"^\s*(?P<sequences>\d+) sequences, (?P<tokens>\d+) tokens each: step median (?P<median>[\d.]+) ms "
    r"\(p10 (?P<p10>[\d.]+), p90 (?P<p90>[\d.]+)\), (?P<rate>\d+) tokens/s together, (?P<gain>[\d.]+)x one$"
)


def model_of_type(source: Path, kind: str) -> Path:
    """The test model (Q4_1) itself, or a copy of it requantized to `kind`, made once."""
    if kind == "Q4_1":
        return source
    copy = work_dir() / f"{source.stem}.requantized-{kind}.gguf"
    if not copy.exists():
        partial = copy.with_suffix(".partial")
        subprocess.run(
            [sys.executable, str(BENCH_DIR / "requantize.py"), str(source), str(partial), kind], check=True
        )
        partial.rename(copy)
    return copy


def run_example(model: Path, prompt_tokens: int) -> list[dict[str, Any]]:
    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache/llama-sessions/target"))
    out = subprocess.run(
        [*CARGO_RUN, str(model), str(prompt_tokens)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        match = LINE.match(line)
        if match:
            rows.append(
                {
                    "sequences": int(match["sequences"]),
                    "prompt_tokens": int(match["tokens"]),
                    "step_ms_median": float(match["median"]),
                    "step_ms_p10": float(match["p10"]),
                    "step_ms_p90": float(match["p90"]),
                    "tokens_per_second": float(match["rate"]),
                    "gain_over_one": float(match["gain"]),
                }
            )
    if [r["sequences"] for r in rows] != [1, 2, 4, 8, 16]:
        raise SystemExit(f"batch_scaling printed no line for every count:\n{out}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_1,Q8_0,Q4_0")
    parser.add_argument("--lengths", default="200,450")
    args = parser.parse_args()
    env = environment()
    source = default_model_path()
    results = []
    for kind in args.types.split(","):
        model = model_of_type(source, kind)
        for length in (int(n) for n in args.lengths.split(",")):
            rows = run_example(model, length)
            print(kind, length, [(r["sequences"], r["gain_over_one"]) for r in rows], flush=True)
            results.append({"type": kind, "prompt_tokens": length, "rows": rows})
    write_result("batch_ceiling", {"environment": env, "command": COMMAND, "runs": results})


if __name__ == "__main__":
    main()
