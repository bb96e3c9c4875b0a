"""load_session and save_session against the hardware limit for the same number of bytes.

A 2000-token f16 state (n_ctx 4096). The limits:
  load: read the file from the page cache into a preallocated buffer (readinto) and copy it once more
        (numpy.copyto into a second preallocated buffer, as llama.cpp copies the state into the KV cache);
  save: write the same bytes to a new file in the same directory, fsync it, rename it over the previous one
        and fsync the directory (what save_session's atomic write does).
The runs of ours and of the limit alternate. The phases of a load and a save are timed too, to show what costs
what: reading the file into new bytes (as the library does), inspect_session(bytes) (checksum and header),
restore(bytes) (checks, llama.cpp's state load, bookkeeping), reset() (which clears the whole KV buffer, as
restore does first), snapshot() (llama.cpp's state copy, checksum), and the minor page faults of each.

Run: python bench/io_limit.py [--runs 9]
"""

from __future__ import annotations

import argparse
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from _common import THREADS, build_prompt, environment, guarded_time, summary, work_dir, write_result
from llama_sessions import Context, Model, default_model_path, inspect_session

N_TOKENS = 2000
N_CTX = 4096
TARGET_RATIO = 2.0
COMMAND = "python bench/io_limit.py"


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function over ``runs`` rounds (one call of each per round), after ``warmup`` rounds."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        for name, fn in fns.items():
            elapsed = guarded_time(fn, name)
            if i >= warmup:
                out[name].append(elapsed)
    return out


def minor_faults(fn: Callable[[], object]) -> int:
    """Minor page faults of one call of ``fn`` (each is a page of memory touched for the first time)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def durable_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file next to ``path``, fsync it, rename it over ``path``, fsync the
    directory."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
    path = directory / "io_limit.session"
    limit_path = directory / "io_limit.limit"
    ctx.save_session(path)
    data = path.read_bytes()
    size = len(data)
    info = inspect_session(data)
    loader = Context(model, n_ctx=N_CTX, n_threads=THREADS)

    # Load: ours vs read + one copy into preallocated (and already touched) buffers.
    buf = bytearray(size)
    src = np.frombuffer(buf, dtype=np.uint8)
    dst = np.ones(size, dtype=np.uint8)

    def read_into() -> None:
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)

    def read_copy_limit() -> None:
        read_into()
        np.copyto(dst, src)

    load = interleaved(
        {
            "load_session": lambda: loader.load_session(path),
            "limit_read_copy": read_copy_limit,
            "read_into_preallocated": read_into,
            "copy_once": lambda: np.copyto(dst, src),
            "read_bytes_new_buffer": path.read_bytes,
            "inspect_session_bytes": lambda: inspect_session(data),
            "restore_bytes": lambda: loader.restore(data),
            "reset_clears_kv": loader.reset,
        },
        args.runs,
    )
    # Save: ours vs durable write of the same bytes.
    save = interleaved(
        {
            "save_session": lambda: ctx.save_session(path),
            "limit_write_fsync_rename": lambda: durable_write(limit_path, data),
            "snapshot": ctx.snapshot,
        },
        args.runs,
    )
    faults = {
        "load_session": minor_faults(lambda: loader.load_session(path)),
        "restore_bytes": minor_faults(lambda: loader.restore(data)),
        "read_bytes_new_buffer": minor_faults(path.read_bytes),
        "limit_read_copy": minor_faults(read_copy_limit),
        "save_session": minor_faults(lambda: ctx.save_session(path)),
        "snapshot": minor_faults(ctx.snapshot),
        "limit_write_fsync_rename": minor_faults(lambda: durable_write(limit_path, data)),
    }
    path.unlink()
    limit_path.unlink()

    load_s = {k: summary(v) for k, v in load.items()}
    save_s = {k: summary(v) for k, v in save.items()}
    load_ratio = load_s["load_session"]["median"] / load_s["limit_read_copy"]["median"]
    save_ratio = save_s["save_session"]["median"] / save_s["limit_write_fsync_rename"]["median"]
    for name, s in {**load_s, **save_s}.items():
        print(f"{name:28s} {s['median'] * 1e3:8.2f} ms")
    print(f"load / limit {load_ratio:.2f}x, save / limit {save_ratio:.2f}x")
    write_result(
        "io_limit",
        {
            "name": "io_limit",
            "environment": env,
            "config": {
                "tokens": N_TOKENS,
                "n_ctx": N_CTX,
                "type_k": "f16",
                "type_v": "f16",
                "n_threads": THREADS,
                "runs": args.runs,
                "warmup": 1,
                "file_system": _file_system(directory),
            },
            "session_bytes": size,
            "state_bytes": info.state_bytes,
            "load": load_s,
            "save": save_s,
            "minor_page_faults": faults,
            "page_bytes": os.sysconf("SC_PAGE_SIZE"),
            "load_ratio": load_ratio,
            "save_ratio": save_ratio,
            "targets": [
                {
                    "name": "load_session vs reading the bytes from the page cache + one copy",
                    "measured": f"{load_ratio:.2f}x the limit",
                    "target": f"<= {TARGET_RATIO:.0f}x",
                    "pass": load_ratio <= TARGET_RATIO,
                    "command": COMMAND,
                },
                {
                    "name": "save_session vs writing the bytes + fsync + rename",
                    "measured": f"{save_ratio:.2f}x the limit",
                    "target": f"<= {TARGET_RATIO:.0f}x",
                    "pass": save_ratio <= TARGET_RATIO,
                    "command": COMMAND,
                },
            ],
        },
    )


def _file_system(directory: Path) -> dict[str, Any]:
    """The mount that holds ``directory``: device, type and mount point (from /proc/mounts)."""
    best: dict[str, Any] = {}
    resolved = str(directory.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, fstype = line.split()[:3]
        if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(
            best.get("mount", "")
        ):
            best = {"device": device, "mount": mount, "type": fstype}
    return best


if __name__ == "__main__":
    main()
