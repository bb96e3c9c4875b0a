"""SessionManager scenarios that used to hang the whole process (used by test_manager_hardening.py).

    python tests/manager_hardening_worker.py SCENARIO MODEL DIR

A hang here can hold the GIL, so no thread of the test process could end it: the test runs each scenario in a
process of its own and fails if the process outlives its bound. Each scenario prints one JSON object.

``history-during-turn``: a thread chats one turn with a long prefill (the turn's native work takes the GIL
back every few milliseconds to check for Ctrl-C) while the main thread keeps reading ``history()`` and
``system_prompt()`` of the same session.

``live-set-during-eviction``: the main thread holds the file lock of a changed session; a thread loads another
session, which evicts the first, whose save waits for that file lock. Meanwhile the main thread reads
``live_sessions()`` and ``repr()``, then lets the lock go.

``ctrl-c-while-waiting-for-a-turn``: a stream of a session is open; a second ``stream_chat`` on it waits for
the first to end, and Ctrl-C (``_thread.interrupt_main``) must end that wait.
"""

from __future__ import annotations

import _thread
import fcntl
import json
import os
import sys
import threading
from typing import Any

from llama_sessions import Model, SessionManager, list_sessions

SYS = "You are a helpful assistant who answers in one sentence."
#: About 1000 tokens: a prefill of many batches, long enough for many Ctrl-C checks.
LONG_MESSAGE = "The lighthouse keeper counted the waves and wrote each number down. " * 70


def open_manager(model: Model, session_dir: str, *, max_live: int = 8, n_batch: int = 128) -> SessionManager:
    # Without autosave: the scenarios need sessions whose changes are saved only when they are evicted.
    return SessionManager(
        model, session_dir, max_live=max_live, autosave=False, n_ctx=2048, n_batch=n_batch, n_threads=1
    )


def history_during_turn(model: Model, session_dir: str) -> dict[str, Any]:
    manager = open_manager(model, session_dir, n_batch=16)
    manager.create_session("x", SYS)
    errors: list[str] = []

    def turn() -> None:
        try:
            manager.chat("x", LONG_MESSAGE, 2, temperature=0)
        except BaseException as e:  # reported in the output
            errors.append(repr(e))

    worker = threading.Thread(target=turn)
    worker.start()
    reads = 0
    seen = set()
    while worker.is_alive():
        seen.add(len(manager.history("x")))
        assert manager.system_prompt("x") == SYS
        reads += 1
    worker.join()
    final = len(manager.history("x"))
    return {"reads": reads, "history_lengths": sorted(seen), "final": final, "errors": errors}


def live_set_during_eviction(model: Model, session_dir: str) -> dict[str, Any]:
    manager = open_manager(model, session_dir, max_live=1)
    manager.create_session("b", SYS)
    manager.create_session("a", SYS)  # evicts "b"
    manager.chat("a", "Name a color.", 4, temperature=0)  # "a" changed, not saved
    lock_file = os.open(os.path.join(session_dir, ".a.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock_file, fcntl.LOCK_EX)  # what another process saving "a" would hold
    errors: list[str] = []

    def load_other() -> None:
        try:
            manager.load("b")  # evicts "a": its save waits for the file lock
        except BaseException as e:  # reported in the output
            errors.append(repr(e))

    worker = threading.Thread(target=load_other)
    worker.start()
    seen = []
    # "b" joins the live set at once; "a" stays in it until its save is done.
    while (live := manager.live_sessions()) != ["a", "b"]:
        if live not in seen:
            seen.append(live)
    seen.append(live)
    described = repr(manager)
    fcntl.flock(lock_file, fcntl.LOCK_UN)
    os.close(lock_file)
    worker.join()
    return {
        "seen": seen,
        "repr": described,
        "after": manager.live_sessions(),
        "stored_a": {s.id: s.message_count for s in list_sessions(session_dir)}["a"],
        "errors": errors,
    }


def ctrl_c_while_waiting_for_a_turn(model: Model, session_dir: str) -> dict[str, Any]:
    manager = open_manager(model, session_dir)
    manager.create_session("x", SYS)
    first = manager.stream_chat("x", "Name a color.", 4, temperature=0)
    pieces = [next(first)]
    interrupted = False
    timer = threading.Timer(0.3, _thread.interrupt_main)
    try:
        timer.start()
        manager.stream_chat("x", "Name an animal.", 4, temperature=0)
    except KeyboardInterrupt:
        interrupted = True
    timer.join()
    pieces.extend(first)  # the first stream still ends normally and its turn joins the history
    second = manager.chat("x", "Name an animal.", 4, temperature=0)
    return {
        "interrupted": interrupted,
        "first": "".join(pieces),
        "second": second,
        "roles": [m["role"] for m in manager.history("x")],
    }


SCENARIOS = {
    "history-during-turn": history_during_turn,
    "live-set-during-eviction": live_set_during_eviction,
    "ctrl-c-while-waiting-for-a-turn": ctrl_c_while_waiting_for_a_turn,
}


def main(argv: list[str]) -> None:
    scenario, model_path, session_dir = argv[1:4]
    result = SCENARIOS[scenario](Model.load(model_path), session_dir)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
