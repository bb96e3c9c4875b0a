"""Two workers, one store: any worker continues any session exactly.

Start a Redis (or use an ``s3://BUCKET/PREFIX`` URL, see docs/deployment.md), then run::

    redis-server --port 6379 --save "" --daemonize yes
    python examples/two_workers.py redis://127.0.0.1:6379/0

Two worker processes, A and B, each open a SessionManager on the store. This script sends them turns the way
a load balancer would, and checks the three promises of docs/deployment.md:

1. a conversation moved from worker to worker continues token for token as if it had stayed on one worker;
2. two turns at once on one session, one on each worker: one is saved, the other raises
   SessionConflictError and writes nothing;
3. a worker killed mid-turn leaves the session at its last acknowledged turn.

It prints what it saw and exits with status 1 if a promise does not hold. The session it uses (a fresh
name) is deleted at the end; nothing else in the store is touched.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import uuid
from multiprocessing.connection import Connection
from typing import Any

from llama_sessions import (
    LlamaSessionsError,
    Model,
    SessionManager,
    default_model_path,
    delete_session,
    list_sessions,
)

SYSTEM = "You are a helpful assistant who answers in one sentence."
QUESTIONS = ["Name a color.", "Name an animal.", "Name a city.", "Name a fruit."]
#: Every worker and the one-worker reference open their managers alike, so that they compute alike.
MANAGER_OPTIONS: dict[str, Any] = {"n_ctx": 2048, "n_batch": 128, "n_threads": 1}
MAX_TOKENS = 12


def worker(location: str, model_path: str, requests: Connection) -> None:
    """A worker process: a SessionManager on ``location`` that answers ``requests`` until told to stop.

    A request is a tuple: ("create", id), ("chat", id, message), ("start", id, message, max_tokens) which
    begins a streamed turn and answers its first piece, ("finish",) which reads the rest of that turn and
    answers its whole answer, ("history", id), or ("stop",). An exception is answered as ("error", its
    type's name, its message)."""
    manager = SessionManager(Model.load(model_path), location, **MANAGER_OPTIONS)
    stream = None
    first_piece = ""
    while True:
        request = requests.recv()
        try:
            if request[0] == "create":
                manager.create_session(request[1], SYSTEM)
                answer: Any = None
            elif request[0] == "chat":
                answer = manager.chat(request[1], request[2], MAX_TOKENS, temperature=0)
            elif request[0] == "start":
                stream = manager.stream_chat(request[1], request[2], request[3], temperature=0)
                first_piece = answer = next(stream)
            elif request[0] == "finish":
                assert stream is not None, "finish without a started turn"
                answer = first_piece + "".join(stream)
            elif request[0] == "history":
                answer = manager.history(request[1])
            else:
                return
            requests.send(("ok", answer))
        except Exception as e:  # sent back to the script, which reports it
            requests.send(("error", type(e).__name__, str(e)))


class Worker:
    """The script's end of a worker process."""

    def __init__(self, name: str, location: str, model_path: str) -> None:
        self.name = name
        spawn = multiprocessing.get_context("spawn")
        self._requests, theirs = spawn.Pipe()
        self.process = spawn.Process(target=worker, args=(location, model_path, theirs), daemon=True)
        self.process.start()

    def ask(self, *request: Any) -> tuple[Any, ...]:
        """The worker's answer to ``request``: ("ok", value) or ("error", type name, message)."""
        self._requests.send(request)
        answer: tuple[Any, ...] = self._requests.recv()
        return answer

    def value(self, *request: Any) -> Any:
        """The value the worker answers to ``request``; an error it answers stops the script."""
        answer = self.ask(*request)
        if answer[0] != "ok":
            raise SystemExit(f"worker {self.name}: {request[0]} failed: {answer[1]}: {answer[2]}")
        return answer[1]

    def stop(self) -> None:
        if self.process.is_alive():
            self._requests.send(("stop",))
        self.process.join(timeout=30)


def check(holds: bool, what: str) -> bool:
    print(f"  {'ok' if holds else 'FAILED'}: {what}")
    return holds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("location", help="the store: redis://HOST:PORT/DB, rediss://..., s3://BUCKET/PREFIX")
    parser.add_argument("--model", help="a GGUF model (default: the test model, fetched on first use)")
    args = parser.parse_args()
    model_path = args.model or str(default_model_path())
    try:
        # A URL that is not a store, a store that cannot be reached, or a file that is not a model stops
        # the script before any worker starts.
        list_sessions(args.location)
        model = Model.load(model_path)
    except LlamaSessionsError as e:
        parser.error(f"{type(e).__name__}: {e}")
    session = f"two-workers-{uuid.uuid4().hex[:8]}"
    held = True

    # What one worker alone answers: the reference, in a manager on a temporary directory.
    with tempfile.TemporaryDirectory() as directory:
        alone = SessionManager(model, directory, **MANAGER_OPTIONS)
        alone.create_session(session, SYSTEM)
        reference = [alone.chat(session, q, MAX_TOKENS, temperature=0) for q in QUESTIONS[:3]]
        reference_history = alone.history(session)

    a, b = Worker("A", args.location, model_path), Worker("B", args.location, model_path)
    try:
        print("1. A conversation moves between workers (A, B, A):")
        a.value("create", session)
        answers = [w.value("chat", session, q) for w, q in zip([a, b, a], QUESTIONS[:3])]
        for w, q, answer in zip("ABA", QUESTIONS[:3], answers):
            print(f"  worker {w}: {q} -> {answer!r}")
        acknowledged = b.value("history", session)
        held &= check(answers == reference, "every answer is the one a single worker gives")
        held &= check(acknowledged == reference_history, "both workers hold the same history")

        print("2. Two turns at once on one session, one on each worker:")
        a.value("start", session, QUESTIONS[3], MAX_TOKENS)
        b.value("start", session, "Name a river.", MAX_TOKENS)
        first, second = a.ask("finish"), b.ask("finish")
        print(f"  worker A: saved {first[1]!r}" if first[0] == "ok" else f"  worker A: {first}")
        print(f"  worker B: {second[1]}: {second[2]}" if second[0] == "error" else f"  worker B: {second}")
        held &= check(
            first[0] == "ok" and second[:2] == ("error", "SessionConflictError"),
            "the first to end is saved, the other raises SessionConflictError",
        )
        stored = b.value("history", session)
        saved_turn = [{"role": "user", "content": QUESTIONS[3]}, {"role": "assistant", "content": first[1]}]
        held &= check(
            stored == [*acknowledged, *saved_turn],
            "the store holds the saved turn once, and nothing of the other",
        )

        print("3. Worker A is killed in the middle of a long turn:")
        a.value("start", session, "Tell me a very long story.", 400)
        a.process.kill()
        a.process.join()
        after = b.value("history", session)
        held &= check(after == stored, f"worker B loads the last acknowledged turn ({len(after)} messages)")
        print(f"  worker B continues: {b.value('chat', session, 'Name a river.')!r}")
    finally:
        a.stop()
        b.stop()
        delete_session(args.location, session)
    print("every promise held" if held else "a promise did not hold")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
