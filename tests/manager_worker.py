"""SessionManager work in a process of its own (used by test_manager.py).

    python tests/manager_worker.py chat MODEL DIR SESSION_ID MESSAGE
    python tests/manager_worker.py hammer MODEL DIR SESSION_ID NAME TURNS SECONDS

``chat`` opens an autosaving manager on DIR (a restarted process), loads the session, chats one greedy turn
and prints one JSON object: the history and tokens it found, the answer, the history and tokens after it,
and the manager's stats.

``hammer`` prints "ready", waits for a line on stdin, then runs :func:`hammer` and prints its result as JSON.
Any other exception ends the process with a traceback and a non-zero status.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from llama_sessions import Model, SessionConflictError, SessionManager

#: Small, single-threaded contexts: fast, and deterministic whatever else runs on the machine.
N_CTX = 1024
N_BATCH = 128
N_THREADS = 1
#: Tokens per turn of the hammer (short turns, many saves).
HAMMER_TOKENS = 3


def open_manager(
    model: Model, session_dir: str, *, autosave: bool = False, max_live: int = 8
) -> SessionManager:
    return SessionManager(
        model,
        session_dir,
        max_live=max_live,
        autosave=autosave,
        n_ctx=N_CTX,
        n_batch=N_BATCH,
        n_threads=N_THREADS,
    )


def chat_once(model: Model, session_dir: str, session_id: str, message: str) -> dict[str, Any]:
    manager = open_manager(model, session_dir, autosave=True)
    tokens_before = manager.load(session_id).tokens
    history_before = manager.history(session_id)
    text = manager.chat(session_id, message, 8, temperature=0)
    return {
        "tokens_before": tokens_before,
        "history_before": history_before,
        "text": text,
        "tokens": manager.load(session_id).tokens,
        "history": manager.history(session_id),
        "stats": dict(manager.stats),
    }


def hammer(
    model: Model, session_dir: str, session_id: str, name: str, turns: int, deadline: float
) -> dict[str, Any]:
    """Until ``turns`` turns are saved (or ``deadline``, a time.monotonic() value, passes): load the session
    in a fresh manager, chat one short turn, save. A SessionConflictError means another writer saved first;
    the stale copy is dropped with its manager and the next attempt starts from the stored version.

    Returns the user messages of the saved turns (in order), the conflicts and the attempts."""
    saved: list[str] = []
    conflicts = 0
    attempts = 0
    while len(saved) < turns and time.monotonic() < deadline:
        attempts += 1
        message = f"{name} attempt {attempts}: name a color."
        manager = open_manager(model, session_dir)
        manager.load(session_id)
        manager.chat(session_id, message, HAMMER_TOKENS, temperature=0)
        try:
            manager.save(session_id)
        except SessionConflictError:
            conflicts += 1
            continue
        saved.append(message)
    return {"name": name, "saved": saved, "conflicts": conflicts, "attempts": attempts}


def hammer_together(
    model: Model, model_path: str, location: str, session_id: str, processes: int, threads: int, turns: int
) -> dict[str, dict[str, Any]]:
    """``processes`` worker processes (``p0``, ``p1``...) and ``threads`` threads of this process (``t0``...)
    run ``hammer`` on one session at once, started together once every process is ready (60 seconds at
    most each). Returns each one's result by name; a thread that raised has ``{"error": ...}``."""
    import subprocess
    import threading

    seconds = 60.0
    command = [sys.executable, __file__, "hammer", model_path, location, session_id]
    workers = [
        subprocess.Popen(
            [*command, f"p{i}", str(turns), str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    results: dict[str, dict[str, Any]] = {}

    def thread(name: str) -> None:
        try:
            results[name] = hammer(model, location, session_id, name, turns, time.monotonic() + seconds)
        except BaseException as e:  # reported by the test
            results[name] = {"error": repr(e)}

    try:
        for p in workers:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        started = [threading.Thread(target=thread, args=(f"t{i}",), daemon=True) for i in range(threads)]
        for t in started:
            t.start()
        for p in workers:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in workers:
            out, err = p.communicate(timeout=seconds + 60)
            assert p.returncode == 0, err
            result = json.loads(out)
            results[result["name"]] = result
        for t in started:
            t.join(timeout=seconds + 60)
            assert not t.is_alive(), "a hammer thread is stuck"
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def main(argv: list[str]) -> None:
    command, model_path, session_dir, session_id = argv[1:5]
    model = Model.load(model_path)
    if command == "chat":
        result = chat_once(model, session_dir, session_id, argv[5])
    elif command == "hammer":
        name, turns, seconds = argv[5], int(argv[6]), float(argv[7])
        print("ready", flush=True)
        sys.stdin.readline()
        result = hammer(model, session_dir, session_id, name, turns, time.monotonic() + seconds)
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
