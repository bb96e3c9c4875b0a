"""SessionManager: 100 sessions of 500 tokens on one model.

Per run, in a fresh directory: create 100 sessions from one shared 500-token system prompt (the first encodes
it, the other 99 restore it), save each, load each from the live set (memory, after a check of the stored
version: one read of the session's header), then load each from disk in a fresh manager (read, verify,
restore). Reported per operation: the median over the 100 sessions of
each run, then the median over the runs (after a warm-up run).

Run: python bench/manager_sessions.py [--runs 5] [--sessions 100]
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from _common import RUNS, WORK_DIR, build_prompt, environment, guarded, median, write_result
from llama_sessions import Model, SessionManager, default_model_path

SYSTEM_TOKENS = 500
N_CTX = 1024
COMMAND = "python bench/manager_sessions.py"


def one_run(model: Model, system_prompt: str, sessions: int) -> dict[str, Any]:
    directory = WORK_DIR / "manager"
    shutil.rmtree(directory, ignore_errors=True)
    manager = SessionManager(model, directory, n_ctx=N_CTX, max_live=sessions)
    ids = [f"user-{i:03d}" for i in range(sessions)]
    create = []
    for session_id in ids:
        start = time.perf_counter()
        manager.create_session(session_id, system_prompt)
        create.append(time.perf_counter() - start)
    stats = manager.stats
    assert stats["prefix_reuses"] == sessions - 1, stats
    save = []
    for session_id in ids:
        start = time.perf_counter()
        manager.save(session_id)
        save.append(time.perf_counter() - start)
    live = []
    for session_id in ids:
        start = time.perf_counter()
        manager.load(session_id)
        live.append(time.perf_counter() - start)
    assert manager.stats["store_loads"] == 0
    held = manager.load(ids[0]).token_count()
    file_bytes = manager.session_path(ids[0]).stat().st_size
    kv_bytes = manager.live_kv_bytes()
    del manager
    fresh = SessionManager(model, directory, n_ctx=N_CTX, max_live=sessions)
    disk = []
    for session_id in ids:
        start = time.perf_counter()
        fresh.load(session_id)
        disk.append(time.perf_counter() - start)
    assert fresh.stats["store_loads"] == sessions and fresh.stats["prefill_tokens"] == 0
    return {
        "first_create_seconds": create[0],
        "create_from_shared_prompt_seconds": median(create[1:]),
        "create_all_seconds": sum(create),
        "prefill_tokens": stats["prefill_tokens"],
        "save_seconds": median(save),
        "load_live_seconds": median(live),
        "load_from_disk_seconds": median(disk),
        "tokens_per_session": held,
        "file_bytes_per_session": file_bytes,
        "live_kv_bytes": kv_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--sessions", type=int, default=100)
    args = parser.parse_args()
    env = environment()
    model = Model.load(default_model_path())
    system_prompt = build_prompt(model, SYSTEM_TOKENS)
    one_run(model, system_prompt, min(args.sessions, 10))  # warm-up
    runs = [
        guarded(lambda: one_run(model, system_prompt, args.sessions), "manager run") for _ in range(args.runs)
    ]
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    result = {
        "command": COMMAND,
        "sessions": args.sessions,
        "system_prompt_tokens": SYSTEM_TOKENS,
        "n_ctx": N_CTX,
        **{k: median([r[k] for r in runs]) for k in keys},
        **{k: v for k, v in runs[0].items() if k not in keys},
        "runs": runs,
        "environment": env,
    }
    result["restore_speedup_vs_prefill"] = (
        result["first_create_seconds"] / result["create_from_shared_prompt_seconds"]
    )
    result["live_vs_disk_speedup"] = result["load_from_disk_seconds"] / result["load_live_seconds"]
    path = write_result("manager_sessions", result)
    print(
        f"first create (prefill) {result['first_create_seconds'] * 1e3:.0f} ms; "
        f"create from the shared prompt {result['create_from_shared_prompt_seconds'] * 1e3:.1f} ms; "
        f"save {result['save_seconds'] * 1e3:.1f} ms; "
        f"load live {result['load_live_seconds'] * 1e6:.0f} us; load from disk "
        f"{result['load_from_disk_seconds'] * 1e3:.1f} ms -> {path}"
    )


if __name__ == "__main__":
    main()
