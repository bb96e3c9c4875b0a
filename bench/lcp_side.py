"""The llama-cpp-python side of bench/vs_llama_cpp_python.py. Runs with the benchmark virtual environment's
interpreter (never in a process that imports llama_sessions) and prints one JSON document.

  lcp_side.py serve --spec FILE       prefill and generation runs on request (JSON lines on stdin/stdout)
  lcp_side.py saveload --spec FILE    save_state + pickle + write + fsync; read + unpickle + load_state
  lcp_side.py mem --op save|load --spec FILE   peak memory of one save or load (run in a fresh process)

The spec (written by vs_llama_cpp_python.py) holds the model path, the context parameters, the prompt token
ids (our tokenizer's, so both libraries decode exactly the same tokens) and the number of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp  # type: ignore[import-not-found]

from _common import ACCEPTED_CONTENDED, DISCARDED, guarded, guarded_time, measure_peak, summary


def make_llama(spec: dict[str, Any]) -> Any:
    return llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=spec["n_ctx"],
        n_batch=spec["n_batch"],
        n_ubatch=spec["n_batch"],
        n_threads=spec["n_threads"],
        n_threads_batch=spec["n_threads"],
        flash_attn=False,
        verbose=False,
    )


def prefill(llm: Any, tokens: list[int]) -> None:
    llm.reset()
    llm.eval(tokens)


def generate(llm: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """Greedy generation of ``n`` tokens with Llama.generate (the sampler is built once, as in
    create_completion). Returns the seconds until the first token (prompt + 1 sample), the seconds per
    following token (decode of the previous one + sample), and the tokens."""
    llm.reset()
    out: list[int] = []
    start = time.perf_counter()
    first = 0.0
    for token in llm.generate(prompt, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        out.append(token)
        if len(out) == 1:
            first = time.perf_counter()
        if len(out) == n:
            break
    end = time.perf_counter()
    return first - start, (end - first) / (n - 1), out


def save(llm: Any, path: Path) -> None:
    state = llm.save_state()
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())


def load(llm: Any, path: Path) -> None:
    with open(path, "rb") as f:
        state = pickle.load(f)
    llm.load_state(state)


def serve(spec: dict[str, Any]) -> None:
    """Answer {"op": "prefill"} and {"op": "generate"} lines on stdin with one JSON line each, until EOF or
    {"op": "quit"}: the parent alternates these runs with its own, so that a drift of the machine's speed
    affects both libraries alike."""
    llm = make_llama(spec)
    tokens = spec["prompt_tokens"]
    same = llm.tokenize(spec["prompt_text"].encode(), add_bos=True, special=False) == tokens
    print(json.dumps({"ready": True, "same_tokenization": same}), flush=True)
    n = spec["generation_tokens"]
    for line in sys.stdin:
        op = json.loads(line)["op"]
        out: dict[str, Any]
        if op == "prefill":
            out = {"seconds": guarded_time(lambda: prefill(llm, tokens), "llama-cpp-python prefill")}
            assert llm.n_tokens == len(tokens)
        elif op == "generate":
            first, per, generated = guarded(
                lambda: generate(llm, spec["generation_prompt_tokens"], n), "llama-cpp-python generation"
            )
            out = {"first_token_seconds": first, "tokens_per_second": 1 / per, "tokens": generated}
        else:
            break
        out["discarded_runs"] = DISCARDED
        out["contended_runs_kept"] = ACCEPTED_CONTENDED
        print(json.dumps(out), flush=True)


def saveload(spec: dict[str, Any]) -> dict[str, Any]:
    llm = make_llama(spec)
    tokens = spec["prompt_tokens"]
    prefill(llm, tokens)
    path = Path(spec["state_path"])
    runs = spec["runs"]
    phases: dict[str, list[float]] = {
        "save_total": [],
        "save_state": [],
        "pickle_write_fsync": [],
        "load_total": [],
        "read_unpickle": [],
        "load_state": [],
    }

    def save_phases() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        state = llm.save_state()
        t1 = time.perf_counter()
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        return t0, t1, time.perf_counter()

    def load_phases() -> tuple[float, float, float]:
        llm.reset()
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            state = pickle.load(f)
        t1 = time.perf_counter()
        llm.load_state(state)
        return t0, t1, time.perf_counter()

    for i in range(runs + 1):  # the first round is the warm-up
        t0, t1, t2 = guarded(save_phases, "llama-cpp-python save")
        if i:
            phases["save_total"].append(t2 - t0)
            phases["save_state"].append(t1 - t0)
            phases["pickle_write_fsync"].append(t2 - t1)
    for i in range(runs + 1):
        t0, t1, t2 = guarded(load_phases, "llama-cpp-python load")
        assert llm.n_tokens == len(tokens)
        if i:
            phases["load_total"].append(t2 - t0)
            phases["read_unpickle"].append(t1 - t0)
            phases["load_state"].append(t2 - t1)
    state = llm.save_state()
    return {
        "file_bytes": path.stat().st_size,
        "llama_state_bytes": state.llama_state_size,
        "scores_bytes": state.scores.nbytes,
        "input_ids_bytes": state.input_ids.nbytes,
        **{k: summary(v) for k, v in phases.items()},
    }


def mem(spec: dict[str, Any], op: str) -> dict[str, Any]:
    llm = make_llama(spec)
    path = Path(spec["state_path"])
    if op == "save":
        prefill(llm, spec["prompt_tokens"])
        result = measure_peak(lambda: save(llm, path))
    else:
        result = measure_peak(lambda: load(llm, path))
        assert llm.n_tokens == len(spec["prompt_tokens"])
    result["file_bytes"] = path.stat().st_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["serve", "saveload", "mem"])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--op", choices=["save", "load"])
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    if args.mode == "serve":
        serve(spec)
        return
    out = saveload(spec) if args.mode == "saveload" else mem(spec, args.op)
    out["llama_cpp_python"] = llama_cpp.__version__
    out["discarded_runs"] = DISCARDED
    out["contended_runs_kept"] = ACCEPTED_CONTENDED
    out["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
