"""Does one kind of durable work over and over until it is killed (driven by stress/kills.py).

    python stress/kill_worker.py MODE MODEL DIR

MODE is one of:
  save         a Context generates one greedy token, then save_session(DIR/ctx.session); prints "saved N"
               (N: tokens held) once the save returned.
  manager      a SessionManager (autosave off) chats one greedy turn on session "s", then save("s"); prints
               "saved N" (N: turns in the history) once the save returned.
  autosave     a SessionManager with autosave on chats one greedy turn on session "s"; prints "saved N" once
               chat returned (the turn is saved before chat returns).

Every line is flushed before the next piece of work starts: a "saved" line is an acknowledged save. The save
and manager workers print "saving" right before they call the save, so the driver can aim its kills.
The work is deterministic (greedy, one thread), so stress/kills.py can check what survives exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama_sessions import Context, Model, SessionManager

N_CTX = 512
N_BATCH = 64
PROMPT = "<|im_start|>system\nYou are a poet.<|im_end|>\n<|im_start|>user\nWrite about the sea.<|im_end|>\n"
#: Generated tokens after which the save worker truncates back to the prompt, so files stay small.
EXTRA = 48
#: Turns after which the manager workers delete the session and start again.
TURNS = 6
TURN_TOKENS = 6


def message(turn: int) -> str:
    return f"Turn {turn}: name a colour and an animal."


def open_manager(model: Model, directory: Path, autosave: bool) -> SessionManager:
    return SessionManager(
        model, directory, max_live=2, autosave=autosave, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1
    )


def save_loop(model: Model, directory: Path) -> None:
    path = directory / "ctx.session"
    if path.exists():
        ctx = Context.from_session(model, path, n_threads=1)
    else:
        ctx = Context(model, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1)
        ctx.generate(PROMPT, max_tokens=0)
        ctx.save_session(path)
    held = len(model.tokenize(PROMPT, add_bos=True, special=True))  # as generate() parses it
    print(f"saved {ctx.token_count()}", flush=True)
    while True:
        if ctx.token_count() >= held + EXTRA:
            ctx.truncate(held)
        ctx.generate("", max_tokens=1, temperature=0)
        print("saving", flush=True)
        ctx.save_session(path)
        print(f"saved {ctx.token_count()}", flush=True)


def manager_loop(model: Model, directory: Path, autosave: bool) -> None:
    manager = open_manager(model, directory, autosave)
    if not manager.exists("s"):
        manager.create_session("s", "You are a terse assistant.")
        manager.save("s")
    turns = len(manager.history("s")) // 2
    print(f"saved {turns}", flush=True)
    while True:
        if turns >= TURNS:
            manager.delete("s")
            manager.create_session("s", "You are a terse assistant.")
            manager.save("s")
            turns = 0
            print("saved 0", flush=True)
        manager.chat("s", message(turns), TURN_TOKENS, temperature=0)
        if not autosave:
            print("saving", flush=True)
            manager.save("s")
        turns += 1
        print(f"saved {turns}", flush=True)


def main(argv: list[str]) -> None:
    mode, model_path, directory = argv[1], argv[2], Path(argv[3])
    model = Model.load(model_path)
    if mode == "save":
        save_loop(model, directory)
    elif mode in ("manager", "autosave"):
        manager_loop(model, directory, autosave=mode == "autosave")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
