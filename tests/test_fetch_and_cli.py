"""The default model's fetching and the command line."""

from __future__ import annotations

import hashlib
import pathlib

import pytest

from llama_sessions import ModelFetchError, default_model_path
from llama_sessions._fetch import DEFAULT_MODEL_FILE, DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SIZE

from conftest import run_cli


def test_an_override_path_is_returned_as_is(
    monkeypatch: pytest.MonkeyPatch, model_path: pathlib.Path
) -> None:
    monkeypatch.setenv("LLAMA_SESSIONS_MODEL", str(model_path))
    assert default_model_path() == model_path


def test_a_missing_override_path_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("LLAMA_SESSIONS_MODEL", str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelFetchError, match="no such file"):
        default_model_path()


def test_fetch_into_an_empty_cache_verifies_the_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("LLAMA_SESSIONS_MODEL", raising=False)
    monkeypatch.setenv("LLAMA_SESSIONS_CACHE", str(tmp_path))
    path = default_model_path()
    assert path == tmp_path / "models" / DEFAULT_MODEL_FILE
    assert path.stat().st_size == DEFAULT_MODEL_SIZE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == DEFAULT_MODEL_SHA256
    # Nothing but the model, its checksum note and the lock is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [DEFAULT_MODEL_FILE, DEFAULT_MODEL_FILE + ".sha256", DEFAULT_MODEL_FILE + ".lock"]
    )
    # A damaged cached copy is replaced, not trusted.
    with path.open("r+b") as f:
        f.truncate(1000)
    assert default_model_path() == path
    assert path.stat().st_size == DEFAULT_MODEL_SIZE


def test_an_unwritable_cache_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.delenv("LLAMA_SESSIONS_MODEL", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LLAMA_SESSIONS_CACHE", str(blocker))
    with pytest.raises(ModelFetchError, match="cannot create model cache directory"):
        default_model_path()


def test_fetch_model_prints_the_path(model_path: pathlib.Path) -> None:
    result = run_cli("fetch-model", model_path=model_path)
    assert result.returncode == 0
    assert result.stdout.strip() == str(model_path)


def test_a_bad_model_is_reported_without_a_traceback(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope" * 100)
    result = run_cli("demo", "--model", str(bad), model_path=bad)
    assert result.returncode == 1
    assert result.stderr.startswith("llama-sessions: ModelLoadError: cannot load model")
    assert "Traceback" not in result.stderr
