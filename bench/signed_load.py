"""Signed vs unsigned: load_session of the 2000-token f16 session with and without a secret_key.

A signed load verifies a keyed BLAKE3 MAC over the whole file (computed on every core) instead of the XXH3
checksum (computed while the file is read); everything else is the same. Target: signed <= 1.3x unsigned.
Saves and restore(bytes) are measured both ways too. The runs of the two alternate.

Run: python bench/signed_load.py [--runs 9]
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import THREADS, build_prompt, environment, guarded_time, summary, work_dir, write_result
from llama_sessions import Context, Model, default_model_path

N_TOKENS = 2000
N_CTX = 4096
TARGET_RATIO = 1.3
KEY = b"benchmark secret key, 32 bytes!!"
COMMAND = "python bench/signed_load.py"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    ctx = Context(model, n_ctx=N_CTX, n_threads=THREADS)
    ctx.generate(build_prompt(model, N_TOKENS), max_tokens=0)
    assert ctx.token_count() == N_TOKENS
    directory = work_dir()
    unsigned_path, signed_path = directory / "unsigned.session", directory / "signed.session"
    ctx.save_session(unsigned_path)
    ctx.save_session(signed_path, secret_key=KEY)
    unsigned_bytes, signed_bytes = unsigned_path.read_bytes(), signed_path.read_bytes()
    loader = Context(model, n_ctx=N_CTX, n_threads=THREADS)

    fns = {
        "load_unsigned": lambda: loader.load_session(unsigned_path),
        "load_signed": lambda: loader.load_session(signed_path, secret_key=KEY),
        "restore_unsigned": lambda: loader.restore(unsigned_bytes),
        "restore_signed": lambda: loader.restore(signed_bytes, secret_key=KEY),
        "save_unsigned": lambda: ctx.save_session(unsigned_path),
        "save_signed": lambda: ctx.save_session(signed_path, secret_key=KEY),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(1 + args.runs):
        for name, fn in fns.items():
            elapsed = guarded_time(fn, name)
            if i > 0:
                times[name].append(elapsed)
    results: dict[str, Any] = {name: summary(values) for name, values in times.items()}
    ratio = results["load_signed"]["median"] / results["load_unsigned"]["median"]
    data = {
        "environment": env,
        "command": COMMAND,
        "config": {"tokens": N_TOKENS, "n_ctx": N_CTX, "runs": args.runs, "type_kv": "f16"},
        "session_bytes": {"unsigned": len(unsigned_bytes), "signed": len(signed_bytes)},
        "times": results,
        "load_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "targets": [
            {
                "name": "signed load_session / unsigned (2000 tokens, f16)",
                "measured": f"{ratio:.2f}x",
                "target": f"<= {TARGET_RATIO}x",
                "pass": ratio <= TARGET_RATIO,
                "command": COMMAND,
            }
        ],
    }
    write_result("signed_load", data)
    for name, r in results.items():
        print(f"{name:18s} {r['median'] * 1000:8.1f} ms")
    print(f"signed / unsigned load: {ratio:.2f}x (target <= {TARGET_RATIO}x)")


if __name__ == "__main__":
    main()
