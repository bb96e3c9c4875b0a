"""The examples of docs/server.md run as written (by the rule of tests/doc_examples.py) against a real
``llama-sessions serve`` started as the page says, on a free port instead of 8080."""

from __future__ import annotations

import json
import pathlib

import pytest

from doc_examples import ROOT, DocumentRun

from conftest import require_tool
from server_process import running_server


def test_the_server_page_examples_run_against_a_server(
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    model_path: pathlib.Path,
) -> None:
    require_tool("curl", "the page's requests are curl commands")
    monkeypatch.chdir(tmp_path)
    with running_server(tmp_path / "sessions", model_path) as server:
        run = DocumentRun(
            ROOT / "docs" / "server.md",
            model_path,
            replacements={"127.0.0.1:8080": f"127.0.0.1:{server.port}"},
        )
        assert [b.language for b in run.blocks] == ["bash", "python", "python", "bash", "bash"]
        run.run_rest()
        assert [command.split("  #")[0].strip() for command in run.skipped] == [
            "pip install '.[server]'",
            "llama-sessions serve --sessions ./sessions --port 8080",
        ]
        printed = capsys.readouterr().out
        assert "not read again" in printed

        session, checkpoint, revert, deleted, health, metrics = (c.stdout for c in run.commands)
        assert json.loads(session)["id"] == "ada"
        assert len(json.loads(session)["messages"]) == 4
        assert json.loads(checkpoint) == {"id": "ada", "object": "session.checkpoint", "label": "two-colours"}
        assert json.loads(revert)["messages"] == json.loads(session)["messages"]
        assert json.loads(deleted)["deleted"] is True
        assert json.loads(health)["status"] == "ok"
        assert "llama_sessions_prompt_tokens_reused_total" in metrics
        assert server.json("GET", "/v1/sessions")[1]["data"] == []
