"""SIGKILL at random moments during save_session, SessionManager.save and chat with autosave: after each kill
the session loads and equals exactly the last acknowledged state or the one being saved when the kill came.

    python stress/kills.py [--kills 200] [--seed 1]

Each round starts stress/kill_worker.py in one of its three modes (in turn), lets it acknowledge one to
three saves, kills it at a random moment of the next one, and checks what is on disk against a replay of the
same deterministic work (greedy, one thread). Prints a JSON summary; exits non-zero on any loss.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kill_worker as work  # noqa: E402

from llama_sessions import Context, Model, SessionManager, default_model_path  # noqa: E402

MODES = ("save", "manager", "autosave")
#: Names a killed writer may leave: atomic-write-file's temporaries and the manager's lock files.
ALLOWED_LEFTOVERS = re.compile(r"\.(.+)\.[A-Za-z0-9]{6}|\.(.+)\.lock")


class Reference:
    """What the workers' deterministic work produces, computed once."""

    def __init__(self, model: Model) -> None:
        ctx = Context(model, n_ctx=work.N_CTX, n_batch=work.N_BATCH, n_threads=1)
        ctx.generate(work.PROMPT, max_tokens=0)
        self.held = ctx.token_count()
        for _ in range(work.EXTRA):
            ctx.generate("", max_tokens=1, temperature=0)
        self.save_tokens = ctx.tokens
        with tempfile.TemporaryDirectory() as directory:
            manager = work.open_manager(model, Path(directory), autosave=False)
            manager.create_session("s", "You are a terse assistant.")
            self.turn_tokens = [manager.load("s").tokens]
            self.turn_history = [manager.history("s")]
            for turn in range(work.TURNS):
                manager.chat("s", work.message(turn), work.TURN_TOKENS, temperature=0)
                self.turn_tokens.append(manager.load("s").tokens)
                self.turn_history.append(manager.history("s"))

    def next_save(self, held: int) -> int:
        return self.held + 1 if held >= self.held + work.EXTRA else held + 1


def read_ack(line: str) -> int | None:
    return int(line.split()[1]) if line.startswith("saved ") else None


def run_round(mode: str, model_path: Path, directory: Path, rng: random.Random) -> tuple[int, bool]:
    """Starts a worker, lets it acknowledge 1 to 3 saves, kills it at a random moment of the next save (of
    the next turn, for autosave); returns the last acknowledged value and whether the kill came between
    "saving" and "saved"."""
    worker = subprocess.Popen(
        [sys.executable, str(HERE / "kill_worker.py"), mode, str(model_path), str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    try:
        first = worker.stdout.readline()
        if not first.startswith("saved "):
            stderr = worker.stderr.read() if worker.stderr else ""
            raise RuntimeError(f"{mode} worker failed: {first!r} {stderr}")
        ack = int(first.split()[1])
        aim = mode != "autosave"  # the autosave worker saves inside chat: aim at the whole turn
        wanted = rng.randint(1, 3)  # acknowledged saves to let through before the kill
        durations: list[float] = []  # of saves (aim) or of whole turns (autosave)
        started: float | None = None if aim else time.monotonic()
        while True:
            line = worker.stdout.readline()
            if not line:
                stderr = worker.stderr.read() if worker.stderr else ""
                raise RuntimeError(f"{mode} worker ended: {stderr}")
            if line == "saving\n":
                started = time.monotonic()
                if len(durations) >= wanted:
                    break  # kill inside this save
            elif (value := read_ack(line)) is not None:
                ack = value
                if started is not None:
                    durations.append(time.monotonic() - started)
                started = None if aim else time.monotonic()
                if not aim and len(durations) >= wanted:
                    break  # kill somewhere inside the next turn
        time.sleep(rng.uniform(0.0, 1.0) * min(durations))
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        rest = [line for line in worker.stdout.read().split("\n") if line]
        for line in rest:
            ack = read_ack(line) if read_ack(line) is not None else ack
        mid_save = aim and not rest
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        for stream in (worker.stdout, worker.stderr):
            if stream is not None:
                stream.close()
    return ack, mid_save


def check(mode: str, model: Model, directory: Path, ack: int, ref: Reference) -> str:
    """Raises AssertionError unless the session on disk is the acknowledged state or the next one; returns
    which ("old" or "new")."""
    if mode == "save":
        ctx = Context.from_session(model, directory / "ctx.session", n_threads=1)
        held = ctx.token_count()
        assert held in (ack, ref.next_save(ack)), (held, ack)
        assert ctx.tokens == ref.save_tokens[:held]
        return "old" if held == ack else "new"
    manager = SessionManager(
        model, directory, max_live=1, n_ctx=work.N_CTX, n_batch=work.N_BATCH, n_threads=1
    )
    if not manager.exists("s"):
        assert ack == work.TURNS, f"session missing after {ack} acknowledged turns"
        return "new"
    turns = len(manager.history("s")) // 2
    following = 0 if ack == work.TURNS else ack + 1
    assert turns in (ack, following), (turns, ack)
    assert manager.history("s") == ref.turn_history[turns]
    assert manager.load("s").tokens == ref.turn_tokens[turns]
    leftovers = [n for n in os.listdir(directory) if not n.endswith(".session")]
    assert all(ALLOWED_LEFTOVERS.fullmatch(n) for n in leftovers), leftovers
    return "old" if turns == ack else "new"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    model_path = default_model_path()
    model = Model.load(model_path)
    ref = Reference(model)
    started = time.monotonic()
    results: dict[str, dict[str, int]] = {
        m: {"kills": 0, "mid_save": 0, "old": 0, "new": 0, "losses": 0} for m in MODES
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as root:
        dirs = {m: Path(root) / m for m in MODES}
        for d in dirs.values():
            d.mkdir()
        for i in range(args.kills):
            mode = MODES[i % len(MODES)]
            ack, mid_save = run_round(mode, model_path, dirs[mode], rng)
            results[mode]["kills"] += 1
            results[mode]["mid_save"] += mid_save
            try:
                results[mode][check(mode, model, dirs[mode], ack, ref)] += 1
            except AssertionError as e:
                results[mode]["losses"] += 1
                failures.append(f"kill {i} ({mode}, {ack} acknowledged): {e!r}")
    summary: dict[str, Any] = {
        "command": f"python stress/kills.py --kills {args.kills} --seed {args.seed}",
        "kills": args.kills,
        "seconds": round(time.monotonic() - started, 1),
        "per_mode": results,
        "losses": sum(r["losses"] for r in results.values()),
        "failures": failures[:20],
    }
    print(json.dumps(summary, indent=2))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
