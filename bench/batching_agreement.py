"""How often a chat decoded in a batch agrees with the same chat decoded alone (issue 12: measured, not
asserted).

A session decoded together with others shares each step's matrices with them; the kernels then accumulate in
another order, and a logit may differ in its last bits, enough now and then to change a sampled token. For
``--chats`` chats (a system prompt, then one question each), run ``--at-once`` of them at a time through a
SessionManager with batching=True, each in its own thread, and each alone through the same manager; compare
the answers (seeded sampling at temperature 0.7, seed = the chat's number, and greedy). The same chats
also run together through a manager whose sessions share one cache of ``kv_cells`` (256 per chat at once),
compared with the same solo runs. Reported: how many agree exactly, and for the others, where the first
difference is (in characters of the answer). Timing plays no part.

Run: python bench/batching_agreement.py [--chats 50] [--at-once 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import threading
from typing import Any

from _common import THREADS, environment, work_dir, write_result
from llama_sessions import Model, SessionManager, default_model_path

SYSTEM = "You are a knowledgeable assistant. Answer in a few full sentences."
SUBJECTS = [
    "lighthouses", "bread", "city markets", "steam engines", "the moon", "rivers", "bees", "libraries",
    "glaciers", "violins", "trains", "volcanoes", "tea", "owls", "bridges", "maps", "salt", "clocks",
    "forests", "kites", "coral reefs", "paper", "windmills", "comets", "honey",
]  # fmt: skip
QUESTIONS = ["Tell me something surprising about {}.", "Why do people care about {}?"]
MAX_TOKENS = 64
COMMAND = "python bench/batching_agreement.py"


def question(i: int) -> str:
    return QUESTIONS[i // len(SUBJECTS) % len(QUESTIONS)].format(SUBJECTS[i % len(SUBJECTS)])


def first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def answers(
    manager: SessionManager, chats: range, at_once: int, sampling: dict[str, Any], tag: str
) -> list[str]:
    """Each chat's answer; ``at_once`` chats run together (1: one after the other)."""
    out = [""] * len(chats)

    def chat(i: int) -> None:
        sid = f"{tag}-{i}"
        manager.create_session(sid, SYSTEM)
        seed = i if sampling["temperature"] > 0 else None
        out[i] = manager.chat(sid, question(i), MAX_TOKENS, seed=seed, **sampling)

    for start in range(0, len(chats), at_once):
        group = [threading.Thread(target=chat, args=(i,)) for i in chats[start : start + at_once]]
        for t in group:
            t.start()
        for t in group:
            t.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--chats", type=int, default=50)
    parser.add_argument("--at-once", type=int, default=8)
    args = parser.parse_args()
    env = environment()
    model = Model.load(default_model_path())
    root = work_dir() / "batching-agreement"
    shutil.rmtree(root, ignore_errors=True)
    options: dict[str, Any] = {
        "max_live": args.at_once,
        "n_ctx": 512,
        "n_batch": 128,
        "n_threads": THREADS,
        "batching": True,
    }
    manager = SessionManager(model, root / "streams", **options)
    shared = SessionManager(model, root / "shared", kv_cells=256 * args.at_once, **options)
    chats = range(args.chats)
    modes: dict[str, Any] = {}
    for mode, sampling in (("seeded", {"temperature": 0.7}), ("greedy", {"temperature": 0.0})):
        # Alone in the pool of streams: computed exactly as in a context of its own (asserted in the tests).
        alone = answers(manager, chats, 1, sampling, f"{mode}-alone")
        for name, batched in ((mode, manager), (f"{mode}, shared kv_cells", shared)):
            together = answers(batched, chats, args.at_once, sampling, f"{mode}-together")
            assert all(together) and all(alone)
            differences = [first_difference(a, b) for a, b in zip(together, alone) if a != b]
            modes[name] = {
                "chats": args.chats,
                "agree": args.chats - len(differences),
                "first_difference_chars": differences,
                "median_answer_chars": statistics.median(len(a) for a in alone),
            }
            print(
                f"{name}: {modes[name]['agree']} of {args.chats} batched chats equal their solo runs; "
                f"first differences at characters {differences}",
                flush=True,
            )
    stats = manager.stats
    write_result(
        "batching_agreement",
        {
            "environment": env,
            "command": COMMAND,
            "at_once": args.at_once,
            "max_tokens": MAX_TOKENS,
            "max_sessions_in_step": stats["max_sessions_in_step"],
            "modes": modes,
        },
    )


if __name__ == "__main__":
    main()
