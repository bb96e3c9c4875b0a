"""llama_sessions against llama-cpp-python: prefill and generation speed, saving and loading the state, file
size, peak memory while saving and loading.

Same model, n_threads 2, n_ctx 4096, n_batch (and n_ubatch) 512, f16 KV, no flash attention; both decode the
same token ids (ours). llama-cpp-python runs in its own virtual environment
(~/.cache/llama-sessions/bench-venv, built from source with GGML_NATIVE=ON and without AMX, see
docs/benchmarks.md), through bench/lcp_side.py in subprocesses, so the two libraries never share a process.

  The prefill and generation runs of the two libraries alternate (llama-cpp-python waits for requests in its
  own process), so that a drift of the machine's speed (seen here: +-10% over minutes) affects both alike.
  prefill: a 2000-token prompt into an emptied context (ours: reset() + generate(prompt, max_tokens=0);
           theirs: reset() + eval(tokens)).
  generation: greedy, 128 tokens after a short prompt. Ours: GenerationStats (per token: sample + decode);
           theirs: Llama.generate, seconds between the first and the 128th token / 127 (per token: decode of
           the previous token + sample).
  save: ours save_session (atomic: temporary file, fsync, rename, directory fsync); theirs save_state() +
        pickle.dump to a file + fsync.
  load: ours load_session; theirs pickle.load from the file + load_state().
  memory: bench/memory.py's method (fresh process per run, VmHWM - VmRSS around the one operation).

Run: python bench/vs_llama_cpp_python.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import memory
from _common import (
    GENERATION_PROMPT,
    GENERATION_TOKENS,
    RUNS,
    THREADS,
    VENV_PYTHON,
    build_prompt,
    environment,
    guarded,
    guarded_time,
    median,
    run_json,
    summary,
    work_dir,
    write_result,
)
from llama_sessions import Context, Model, default_model_path, inspect_session

N_TOKENS = 2000
N_CTX = 4096
N_BATCH = 512
SIDE = Path(__file__).resolve().parent / "lcp_side.py"
COMMAND = "python bench/vs_llama_cpp_python.py"
#: Seconds between the runs of the two libraries (so that one's idle threads are asleep when the other runs).
PAUSE = 0.3


class Theirs:
    """llama-cpp-python in a subprocess (bench/lcp_side.py serve) that runs one prefill or generation per
    request."""

    def __init__(self, spec_path: Path) -> None:
        self.proc = subprocess.Popen(
            [str(VENV_PYTHON), str(SIDE), "serve", "--spec", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"lcp_side.py serve ended (exit status {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, op: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


def speed(model: Model, prompt: str, runs: int, spec: dict[str, Any], spec_path: Path) -> tuple[Any, Any]:
    """Prefill and generation, the runs of ours and of theirs alternating (each after a warm-up)."""
    ctx = Context(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=THREADS)

    def prefill() -> float:
        ctx.reset()
        start = time.perf_counter()
        ctx.generate(prompt, max_tokens=0)
        return time.perf_counter() - start

    def generate() -> float:
        ctx.reset()
        ctx.generate(GENERATION_PROMPT, max_tokens=GENERATION_TOKENS, temperature=0)
        stats = ctx.last_stats
        assert stats is not None
        if stats.generated_tokens != GENERATION_TOKENS:
            raise RuntimeError(f"generated {stats.generated_tokens} tokens ({stats.stop_reason})")
        return stats.generation_tokens_per_second

    prefill()  # warm-up; gives the token ids both libraries decode
    spec["prompt_tokens"] = ctx.tokens
    assert len(spec["prompt_tokens"]) == N_TOKENS
    generate()  # warm-up
    all_tokens = ctx.tokens
    n_prompt = len(all_tokens) - GENERATION_TOKENS
    spec["generation_prompt_tokens"] = all_tokens[:n_prompt]
    spec_path.write_text(json.dumps(spec))
    their = Theirs(spec_path)
    their.ask("prefill")  # warm-up
    their.ask("generate")  # warm-up
    ours_prefill, their_prefill, ours_gen, their_gen = [], [], [], []
    for _ in range(runs):
        ours_prefill.append(guarded(prefill, "ours prefill"))
        time.sleep(PAUSE)
        their_prefill.append(their.ask("prefill")["seconds"])
        time.sleep(PAUSE)
    for _ in range(runs):
        ours_gen.append(guarded(generate, "ours generation"))
        time.sleep(PAUSE)
        their_gen.append(their.ask("generate"))
        time.sleep(PAUSE)
    their.close()
    ours = {
        "prefill_tokens": N_TOKENS,
        "prefill_seconds": summary(ours_prefill),
        "prefill_tokens_per_second": [N_TOKENS / s for s in ours_prefill],
        "generation_tokens_per_second": ours_gen,
        "generated_tokens": all_tokens[n_prompt:],
    }
    theirs_ = {
        "same_tokenization": their.hello["same_tokenization"],
        "prefill_tokens": N_TOKENS,
        "prefill_seconds": summary(their_prefill),
        "prefill_tokens_per_second": [N_TOKENS / s for s in their_prefill],
        "generation_tokens_per_second": [g["tokens_per_second"] for g in their_gen],
        "generation_first_token_seconds": summary([g["first_token_seconds"] for g in their_gen]),
        "generated_tokens": their_gen[0]["tokens"],
        "discarded_runs": their_gen[-1]["discarded_runs"],
        "contended_runs_kept": their_gen[-1]["contended_runs_kept"],
    }
    return ours, theirs_


def ours_saveload(model: Model, prompt: str, runs: int) -> dict[str, Any]:
    ctx = Context(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=THREADS)
    ctx.generate(prompt, max_tokens=0)
    path = work_dir() / "vs_lcp.session"
    save_s = []
    for i in range(runs + 1):
        elapsed = guarded_time(lambda: ctx.save_session(path), "ours save")
        if i:
            save_s.append(elapsed)
    loader = Context(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=THREADS)
    load_s = []
    for i in range(runs + 1):
        loader.reset()
        elapsed = guarded_time(lambda: loader.load_session(path), "ours load")
        if i:
            load_s.append(elapsed)
        assert loader.token_count() == N_TOKENS
    size = path.stat().st_size
    info = inspect_session(path)
    path.unlink()
    return {
        "file_bytes": size,
        "state_bytes": info.state_bytes,
        "save_total": summary(save_s),
        "load_total": summary(load_s),
    }


def theirs(mode: str, spec_path: Path, *extra: str) -> Any:
    return run_json([str(VENV_PYTHON), str(SIDE), mode, "--spec", str(spec_path), *extra])


def theirs_memory(spec_path: Path, runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op in ("save", "load"):
        results = [theirs("mem", spec_path, "--op", op) for _ in range(runs)]
        out[op] = {
            "peak_above_baseline_median": median([r["peak_above_baseline"] for r in results]),
            "baseline_rss_median": median([r["baseline_rss"] for r in results]),
            "file_bytes": results[0]["file_bytes"],
            "runs": results,
        }
    return out


def target(name: str, measured: str, target: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "measured": measured, "target": target, "pass": ok, "command": COMMAND}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=RUNS)
    args = parser.parse_args()
    if not VENV_PYTHON.exists():
        sys.exit(f"{VENV_PYTHON} not found: install llama-cpp-python first (docs/benchmarks.md)")

    env = environment()
    model = Model.load(default_model_path())
    prompt = build_prompt(model, N_TOKENS)
    spec_path = work_dir() / "vs_lcp_spec.json"
    state_path = work_dir() / "vs_lcp.llamastate"
    spec: dict[str, Any] = {
        "model": str(model.path),
        "n_ctx": N_CTX,
        "n_batch": N_BATCH,
        "n_threads": THREADS,
        "prompt_text": prompt,
        "generation_tokens": GENERATION_TOKENS,
        "runs": args.runs,
        "state_path": str(state_path),
    }
    print("speed (ours and llama-cpp-python alternating)", file=sys.stderr, flush=True)
    ours, their = speed(model, prompt, args.runs, spec, spec_path)
    print("ours: save/load", file=sys.stderr, flush=True)
    ours["saveload"] = ours_saveload(model, prompt, args.runs)
    print("ours: memory", file=sys.stderr, flush=True)
    ours["memory"] = memory.measure_ours(args.runs)
    print("llama-cpp-python: save/load", file=sys.stderr, flush=True)
    their["saveload"] = theirs("saveload", spec_path)
    their["llama_cpp_python"] = their["saveload"]["llama_cpp_python"]
    their["system_info"] = their["saveload"]["system_info"]
    print("llama-cpp-python: memory", file=sys.stderr, flush=True)
    their["memory"] = theirs_memory(spec_path, args.runs)
    state_path.unlink()
    spec_path.unlink()

    ratios = {
        "prefill": median(ours["prefill_tokens_per_second"]) / median(their["prefill_tokens_per_second"]),
        "generation": median(ours["generation_tokens_per_second"])
        / median(their["generation_tokens_per_second"]),
        "load_speedup": their["saveload"]["load_total"]["median"] / ours["saveload"]["load_total"]["median"],
        "save_speedup": their["saveload"]["save_total"]["median"] / ours["saveload"]["save_total"]["median"],
        "file_size": their["saveload"]["file_bytes"] / ours["saveload"]["file_bytes"],
        "save_memory": their["memory"]["save"]["peak_above_baseline_median"]
        / ours["memory"]["save"]["peak_above_baseline_median"],
        "load_memory": their["memory"]["load"]["peak_above_baseline_median"]
        / ours["memory"]["load"]["peak_above_baseline_median"],
    }
    same = sum(a == b for a, b in zip(ours["generated_tokens"], their["generated_tokens"]))
    for k, v in ratios.items():
        print(f"{k:14s} {v:.3f}")
    targets = [
        target(
            f"prefill tokens/s ({N_TOKENS}-token prompt), ours / llama-cpp-python",
            f"{ratios['prefill']:.3f} ({median(ours['prefill_tokens_per_second']):.1f} vs "
            f"{median(their['prefill_tokens_per_second']):.1f} tok/s)",
            ">= 0.95",
            ratios["prefill"] >= 0.95,
        ),
        target(
            f"generation tokens/s (greedy, {GENERATION_TOKENS} tokens), ours / llama-cpp-python",
            f"{ratios['generation']:.3f} ({median(ours['generation_tokens_per_second']):.1f} vs "
            f"{median(their['generation_tokens_per_second']):.1f} tok/s)",
            ">= 0.95",
            ratios["generation"] >= 0.95,
        ),
        target(
            f"load ({N_TOKENS} tokens): llama-cpp-python read + unpickle + load_state / our load_session",
            f"{ratios['load_speedup']:.1f}x faster ({ours['saveload']['load_total']['median'] * 1e3:.1f} vs "
            f"{their['saveload']['load_total']['median'] * 1e3:.1f} ms)",
            ">= 5x",
            ratios["load_speedup"] >= 5,
        ),
        target(
            f"file size ({N_TOKENS} tokens): llama-cpp-python pickled LlamaState / our session",
            f"{ratios['file_size']:.2f}x smaller ({ours['saveload']['file_bytes'] / 1e6:.1f} vs "
            f"{their['saveload']['file_bytes'] / 1e6:.1f} MB)",
            ">= 2x",
            ratios["file_size"] >= 2,
        ),
    ]
    write_result(
        "vs_llama_cpp_python",
        {
            "name": "vs_llama_cpp_python",
            "environment": env,
            "config": {
                "n_ctx": N_CTX,
                "n_batch": N_BATCH,
                "n_ubatch": N_BATCH,
                "n_threads": THREADS,
                "type_k": "f16",
                "type_v": "f16",
                "flash_attn": False,
                "prefill_tokens": N_TOKENS,
                "generation_prompt": GENERATION_PROMPT,
                "generation_tokens": GENERATION_TOKENS,
                "runs": args.runs,
                "warmup": 1,
                "order": "prefill and generation: the runs of ours and theirs alternate (llama-cpp-python "
                "in a second process that waits for requests); then save/load and memory, ours first",
            },
            "ours": ours,
            "llama_cpp_python": their,
            "ratios": ratios,
            "same_generated_tokens": same,
            "targets": targets,
        },
    )


if __name__ == "__main__":
    main()
