"""The examples of docs/deployment.md run as written (by the rule of tests/doc_examples.py), against a real
redis-server on a free port instead of 6379, and the tests' S3 server instead of one on port 9000."""

from __future__ import annotations

import pathlib

import pytest

from doc_examples import ROOT, DocumentRun
from llama_sessions import SessionManager


def test_the_deployment_page_examples_run_against_redis_and_s3(
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    model_path: pathlib.Path,
    redis_url: str,
    s3_endpoint: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    # The page's example sets these with setdefault: keep them from leaking into other tests.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minio-secret")
    run = DocumentRun(
        ROOT / "docs" / "deployment.md",
        model_path,
        replacements={"redis://127.0.0.1:6379/0": redis_url, "http://127.0.0.1:9000": s3_endpoint},
    )
    assert [b.language for b in run.blocks] == [
        "bash",
        "bash",
        "python",
        "bash",
        "text",
        "bash",
        "python",
        "bash",
        "python",
        "bash",
    ]
    run.run_rest()
    assert run.skipped == [
        "llama-sessions serve --sessions ./sessions --port 8080",
        "llama-sessions serve --sessions redis://127.0.0.1:6379/0 --port 8081".replace(
            "redis://127.0.0.1:6379/0", redis_url
        ),
        "llama-sessions serve --sessions redis://127.0.0.1:6379/0 --port 8082".replace(
            "redis://127.0.0.1:6379/0", redis_url
        ),
        'redis-server --port 6379 --save "" --daemonize yes',
        "python examples/two_workers.py redis://127.0.0.1:6379/0".replace(
            "redis://127.0.0.1:6379/0", redis_url
        ),
        "SSL_CERT_FILE=/etc/redis/ca.pem llama-sessions serve --sessions rediss://:PASSWORD@redis.internal:6380/0",
        "AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_REGION=eu-west-1      llama-sessions serve "
        "--sessions s3://my-bucket/llama-sessions --port 8081",
        "python tests/s3_server.py --port 9000 --bucket sessions",
    ]
    shared = run.namespace["shared"]
    assert isinstance(shared, SessionManager)
    assert shared.location == "s3://sessions/prod"
    shared.create_session("doc", "You are terse.")
    assert [s.id for s in shared.list()] == ["doc"]
    manager = run.namespace["manager"]
    assert isinstance(manager, SessionManager)
    assert (manager.location, manager.session_dir, manager.storage) == (redis_url, None, "chunks")
    worker = run.namespace["worker"]
    assert isinstance(worker, SessionManager) and worker.prefix_cache is not None
    assert worker.prefix_cache.path == pathlib.Path("local-chunks")
    assert (tmp_path / "local-chunks").is_dir()
