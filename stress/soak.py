"""Soak: threads in two processes create, chat, stream, save, evict, reload, checkpoint, revert and delete
sessions in one directory, for a bounded time. At the end every acknowledged turn must be in its session's
history, and each session's state must answer exactly as a replay of its history does.

    python stress/soak.py [--seconds 240] [--threads 2] [--seed 1]

Each thread owns its own sessions (so what it acknowledged is well defined) but shares its process's
SessionManager (max_live 2 with autosave: sessions are evicted and reloaded all the time) and the directory
with the other process. Prints a JSON summary (operations by kind, errors, losses, deadlocks); exits non-zero
on any error, loss or deadlock. Bounded: every operation has a 120 s watchdog, the run its --seconds.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from llama_sessions import Model, SessionManager, default_model_path

N_CTX = 1024
N_BATCH = 64
TOKENS = 5
SYSTEM = "You are a terse assistant."
WATCHDOG_SECONDS = 120
#: Turns after which a session is deleted rather than grown further (keeps contexts small).
MAX_TURNS = 8


def open_manager(model: Model, directory: Path, max_live: int = 2) -> SessionManager:
    return SessionManager(
        model, directory, max_live=max_live, autosave=True, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1
    )


class Actor:
    """One thread's sessions and what it has been told about them."""

    def __init__(self, name: str, manager: SessionManager, rng: random.Random) -> None:
        self.name, self.manager, self.rng = name, manager, rng
        self.histories: dict[str, list[dict[str, str]]] = {}
        self.checkpoints: dict[str, dict[str, list[dict[str, str]]]] = {}
        self.ops: Counter[str] = Counter()
        self.errors: list[str] = []
        self.turn = 0
        self.op = ""

    def message(self) -> str:
        self.turn += 1
        return f"{self.name} turn {self.turn}: name a fruit."

    def step(self) -> None:
        ids = [f"{self.name}-{i}" for i in range(2)]
        sid = self.rng.choice(ids)
        m = self.manager
        self.op = f"create {sid}"
        if sid not in self.histories:
            m.create_session(sid, SYSTEM)
            self.histories[sid], self.checkpoints[sid] = [], {}
            self.ops["create"] += 1
            return
        history = self.histories[sid]
        # Deleting at random would leave little to check at the end: a session is deleted when it is full.
        op = self.rng.choice(["chat", "chat", "stream", "save", "load", "checkpoint", "revert"])
        if op in ("chat", "stream") and len(history) >= 2 * MAX_TURNS:
            op = "delete"
        self.op = f"{op} {sid}"
        if op == "chat":
            text = self.message()
            answer = m.chat(sid, text, TOKENS, temperature=0)
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        elif op == "stream":
            text = self.message()
            answer = "".join(m.stream_chat(sid, text, TOKENS, temperature=0))
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        elif op == "save":
            m.save(sid)
        elif op == "load":
            m.load(sid)
        elif op == "checkpoint":
            label = f"c{len(history) // 2}"
            m.checkpoint(sid, label)
            self.checkpoints[sid][label] = list(history)
        elif op == "revert":
            if not self.checkpoints[sid]:
                return
            label = self.rng.choice(sorted(self.checkpoints[sid]))
            m.revert(sid, label)
            self.histories[sid] = list(self.checkpoints[sid][label])
        elif op == "delete":
            m.delete(sid)
            del self.histories[sid], self.checkpoints[sid]
        self.ops[op] += 1


def worker(args: argparse.Namespace) -> None:
    """One process: --threads actors sharing one manager until the deadline; prints a JSON report."""
    model = Model.load(default_model_path())
    manager = open_manager(model, Path(args.dir))
    deadline = time.monotonic() + args.seconds
    actors = [
        Actor(f"p{args.process}t{i}", manager, random.Random(args.seed * 1000 + args.process * 10 + i))
        for i in range(args.threads)
    ]
    deadlocks: list[str] = []

    def run(actor: Actor) -> None:
        while time.monotonic() < deadline:
            watchdog = threading.Timer(WATCHDOG_SECONDS, lambda: on_hang(actor))
            watchdog.start()
            try:
                actor.step()
            except Exception as e:  # every error is a finding
                actor.errors.append(f"{actor.op}: {type(e).__name__}: {e}")
            finally:
                watchdog.cancel()

    def on_hang(actor: Actor) -> None:
        deadlocks.append(actor.name)
        faulthandler.dump_traceback(all_threads=True)
        report(actors, deadlocks)
        sys.stdout.flush()
        import os

        os._exit(3)

    threads = [threading.Thread(target=run, args=(a,)) for a in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report(actors, deadlocks)


def report(actors: list[Actor], deadlocks: list[str]) -> None:
    print(
        json.dumps(
            {
                "histories": {sid: h for a in actors for sid, h in a.histories.items()},
                "ops": dict(sum((a.ops for a in actors), Counter())),
                "evictions": actors[0].manager.stats["evictions"] if actors else 0,
                "errors": [e for a in actors for e in a.errors],
                "deadlocks": deadlocks,
            }
        ),
        flush=True,
    )


def replay(model: Model, history: list[dict[str, str]]) -> tuple[list[str], list[int]]:
    """The answers and final tokens of the same conversation, chatted straight through in a fresh manager."""
    with tempfile.TemporaryDirectory() as directory:
        m = open_manager(model, Path(directory), max_live=1)
        m.create_session("r", SYSTEM)
        answers = [m.chat("r", turn["content"], TOKENS, temperature=0) for turn in history[::2]]
        return answers, m.load("r").tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=240)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--process", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as directory:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"--process={p}",
                    f"--dir={directory}",
                    f"--seconds={args.seconds}",
                    f"--threads={args.threads}",
                    f"--seed={args.seed}",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for p in range(2)
        ]
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=args.seconds + 2 * WATCHDOG_SECONDS + 60)
            reports.append(json.loads(out.strip().splitlines()[-1]))
        model = Model.load(default_model_path())
        checker = open_manager(model, Path(directory), max_live=1)
        histories = {sid: h for r in reports for sid, h in r["histories"].items()}
        stored = {s.id for s in checker.list()}
        losses, mismatches = [], []
        for sid, expected in sorted(histories.items()):
            if sid not in stored or checker.history(sid) != expected:
                losses.append(sid)
                continue
            answers, tokens = replay(model, expected)
            if answers != [turn["content"] for turn in expected[1::2]] or checker.load(sid).tokens != tokens:
                mismatches.append(sid)
        extra = sorted(stored - set(histories))
    ops: Counter[str] = Counter()
    for r in reports:
        ops.update(r["ops"])
    summary: dict[str, Any] = {
        "command": f"python stress/soak.py --seconds {args.seconds:g} --threads {args.threads} "
        f"--seed {args.seed}",
        "seconds": round(time.monotonic() - started, 1),
        "processes": 2,
        "threads_per_process": args.threads,
        "operations": sum(ops.values()),
        "by_kind": dict(sorted(ops.items())),
        "evictions": sum(r["evictions"] for r in reports),
        "sessions_checked": len(histories),
        "turns_checked": sum(len(h) // 2 for h in histories.values()),
        "errors": [e for r in reports for e in r["errors"]][:20],
        "losses": losses,
        "replay_mismatches": mismatches,
        "sessions_that_should_not_exist": extra,
        "deadlocks": [d for r in reports for d in r["deadlocks"]],
        "exit_codes": [p.returncode for p in procs],
    }
    print(json.dumps(summary, indent=2))
    bad = (
        summary["errors"]
        or losses
        or mismatches
        or extra
        or summary["deadlocks"]
        or any(summary["exit_codes"])
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
