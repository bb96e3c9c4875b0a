"""Shared fixtures: the real default model, loaded once per test session, and files derived from it."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence

import pytest

from llama_sessions import Context, Model, default_model_path

#: Small contexts keep the suite fast on two cores.
SMALL = {"n_ctx": 512, "n_batch": 64}

SYSTEM = "<|im_start|>system\nYou are a storyteller who writes long, vivid stories.<|im_end|>\n"
STORY = (
    "<|im_start|>user\nTell me a long story about a dragon and a lighthouse.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def assert_same_output(actual: Sequence[object], expected: Sequence[object]) -> None:
    """``actual`` equals ``expected``, a generated output (text or tokens) that is not empty: two empty
    outputs are equal whatever the contexts hold, so comparing them would prove nothing."""
    assert len(expected) > 0, "the expected output is empty: comparing it with another proves nothing"
    assert actual == expected


def require_tool(name: str, why: str) -> str:
    """The path of the command-line tool ``name``. Missing, the test is skipped on a developer's machine but
    fails in CI (``CI`` set), where the setup scripts install it: a skip there would hide a test never run."""
    path = shutil.which(name)
    if path is None:
        fail_in_ci_or_skip(f"{name} is not installed ({why}); scripts/common.sh installs it")
    assert path is not None
    return path


def fail_in_ci_or_skip(reason: str) -> None:
    """Skips the test, or fails it in CI (``CI`` set), where everything a test needs is installed."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def model_path() -> pathlib.Path:
    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path: pathlib.Path) -> Model:
    return Model.load(model_path)


@pytest.fixture
def ctx(model: Model) -> Context:
    return Context(model, **SMALL)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def variant_model_path(model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """SmolLM2 rewritten with other weights: same architecture, metadata, tensor names, types and shapes."""
    from make_variant_model import make_variant

    dst = tmp_path_factory.mktemp("variant") / "smollm2-variant.gguf"
    make_variant(model_path, dst)
    return dst


#: The tiny random-weight models of every memory kind (rust/core/tests/common/arch_models.rs), by file stem.
ARCH_MODELS = {
    "tiny-llama": "attention",
    "tiny-gemma3": "sliding_window",
    "tiny-lfm2": "hybrid",
    "tiny-mamba2": "recurrent",
}
#: gemma3's window in the tiny model.
GEMMA3_N_SWA = 16
REPO = pathlib.Path(__file__).resolve().parent.parent


def arch_models_dir() -> pathlib.Path:
    """Where the tiny models are cached: ``$LLAMA_SESSIONS_ARCH_MODELS`` or ``models/arch`` in the cache."""
    from llama_sessions import cache_dir

    override = os.environ.get("LLAMA_SESSIONS_ARCH_MODELS")
    return pathlib.Path(override) if override else cache_dir() / "models" / "arch"


@pytest.fixture(scope="session")
def arch_model_paths(model_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """The tiny models, built on first use by the ``make_arch_models`` example (llama.cpp builds them from
    GGUF metadata, with SmolLM2's tokenizer; seconds) and cached."""
    out = arch_models_dir()
    paths = {name: out / f"{name}.gguf" for name in ARCH_MODELS}
    if not all(p.exists() for p in paths.values()):
        cargo = require_tool("cargo", "it builds the tiny test models")
        env = dict(os.environ)
        env.setdefault(
            "CARGO_TARGET_DIR",
            str(
                pathlib.Path(env.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
                / "llama-sessions"
                / "target"
            ),
        )
        command = [cargo, "run", "--release", "--locked", "-q", "-p", "llama-sessions", "--example"]
        command += ["make_arch_models", "--", str(model_path), str(out)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
    return paths


def run_cli(*args: str, model_path: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LLAMA_SESSIONS_MODEL=str(model_path))
    return subprocess.run(
        [sys.executable, "-m", "llama_sessions", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` on loopback for one test (installed by scripts/common.sh), as a store URL."""
    import socket
    import time

    executable = require_tool("redis-server", "the Redis session store's tests run a real server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.kill()
        server.wait()
