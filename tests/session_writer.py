"""Saves a session to one path over and over, until it is killed (used by test_sessions.py).

    python tests/session_writer.py MODEL SEED PATH EXTRA

Loads the session SEED (a long prompt, prepared once by the test), saves it to PATH as the known-good
version A and prints "ready". Then, forever: generates one greedy token, prints "saving", saves to PATH and
prints "saved". After EXTRA generated tokens it truncates back to SEED's tokens, so every version it ever
writes holds SEED's tokens followed by the first 0 to EXTRA tokens of one greedy continuation.
"""

from __future__ import annotations

import sys

from llama_sessions import Context, Model


def main(argv: list[str]) -> None:
    model_path, seed, path, extra = argv[1], argv[2], argv[3], int(argv[4])
    model = Model.load(model_path)
    ctx = Context.from_session(model, seed)
    held = ctx.token_count()
    ctx.save_session(path)
    print("ready", flush=True)
    while True:
        if ctx.token_count() >= held + extra:
            ctx.truncate(held)
        ctx.generate("", max_tokens=1, temperature=0)
        print("saving", flush=True)
        ctx.save_session(path, metadata={"tokens": ctx.token_count()})
        print("saved", flush=True)


if __name__ == "__main__":
    main(sys.argv)
