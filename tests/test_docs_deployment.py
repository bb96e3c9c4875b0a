"""The examples of docs/deployment.md run as written (by the rule of tests/doc_examples.py), against a real
redis-server on a free port instead of 6379."""

from __future__ import annotations

import pathlib

import pytest

from doc_examples import ROOT, DocumentRun
from llama_sessions import SessionManager


def test_the_deployment_page_examples_run_against_redis(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, model_path: pathlib.Path, redis_url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    run = DocumentRun(
        ROOT / "docs" / "deployment.md", model_path, replacements={"redis://127.0.0.1:6379/0": redis_url}
    )
    assert [b.language for b in run.blocks] == ["bash", "bash", "python", "python"]
    run.run_rest()
    assert len(run.skipped) == 3 and all(c.startswith("llama-sessions serve") for c in run.skipped)
    manager = run.namespace["manager"]
    assert isinstance(manager, SessionManager)
    assert (manager.location, manager.session_dir, manager.storage) == (redis_url, None, "chunks")
    worker = run.namespace["worker"]
    assert isinstance(worker, SessionManager) and worker.prefix_cache is not None
    assert worker.prefix_cache.path == pathlib.Path("local-chunks")
    assert (tmp_path / "local-chunks").is_dir()
