"""Shared fixtures: the real default model, loaded once per test session, and files derived from it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from llama_sessions import Context, Model, default_model_path

#: Small contexts keep the suite fast on two cores.
SMALL = {"n_ctx": 512, "n_batch": 64}

SYSTEM = "<|im_start|>system\nYou are a storyteller who writes long, vivid stories.<|im_end|>\n"
STORY = (
    "<|im_start|>user\nTell me a long story about a dragon and a lighthouse.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


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
