"""Session stores: save and load of 500, 2,000 and 4,000-token sessions through a SessionManager on a local
directory and on Redis (a real `redis-server` on loopback, started here).

Each session is a Context that read a prompt of N tokens (f16 KV cache, n_ctx 4096). Save: `save(id,
context)`, a version-checked atomic write of the whole session (a file with fsync, or a Redis string under
the session's lease). Load: `load(id)` in a fresh manager, the session read, verified and restored.
Both stores keep sessions whole (`storage="files"`), so the bytes moved are the same. Median of 5 runs
after a warm-up.

Run: python bench/stores.py
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from _common import RUNS, THREADS, build_prompt, environment, summary, work_dir, write_result
from llama_sessions import Context, Model, SessionManager, default_model_path

SIZES = (500, 2000, 4000)
N_CTX = 4096
COMMAND = "python bench/stores.py"


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("stores.py needs redis-server (scripts/common.sh installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tempfile.mkdtemp(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                if connection.recv(16).startswith(b"+PONG"):
                    return server, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)


def manager(model: Model, location: str) -> SessionManager:
    return SessionManager(model, location, n_ctx=N_CTX, n_threads=THREADS, storage="files", max_live=2)


def measure(model: Model, location: str, session: str, context: Context) -> dict[str, Any]:
    writer = manager(model, location)
    writer.save(session, context)  # warm-up: the first save creates the session
    saves = []
    for _ in range(RUNS):
        started = time.perf_counter()
        writer.save(session, context)
        saves.append(time.perf_counter() - started)
    loads = []
    for _ in range(RUNS + 1):
        reader = manager(model, location)
        started = time.perf_counter()
        loaded = reader.load(session)
        loads.append(time.perf_counter() - started)
        assert loaded.tokens == context.tokens
    size = next(s.file_size for s in writer.list() if s.id == session)
    return {"save": summary(saves), "load": summary(loads[1:]), "bytes": size}


def main() -> None:
    env = environment()
    model = Model.load(default_model_path())
    redis, redis_url = start_redis()
    root = work_dir() / "stores"
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    try:
        for n in SIZES:
            context = Context(model, n_ctx=N_CTX, n_threads=THREADS)
            context.generate(build_prompt(model, n), max_tokens=0)
            row: dict[str, Any] = {"tokens": len(context.tokens)}
            for name, location in (("directory", str(root / "sessions")), ("redis", redis_url)):
                row[name] = measure(model, location, f"s{n}", context)
            print(row, flush=True)
            rows.append(row)
    finally:
        redis.kill()
        redis.wait()
    write_result(
        "stores",
        {"environment": env, "command": COMMAND, "config": {"n_ctx": N_CTX, "runs": RUNS}, "rows": rows},
    )


if __name__ == "__main__":
    main()
