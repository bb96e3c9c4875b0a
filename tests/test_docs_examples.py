"""Every code block of README.md and docs/*.md runs as written, by the rule of tests/doc_examples.py: Python
blocks in order in one namespace per document, llama-sessions commands of shell blocks with bash (install,
build, test, benchmark and fuzz commands skipped, each with its reason), JSON parsed, Rust compiled as
doctests. The README and docs/manager.md run in their own tests, which check what their examples print."""

from __future__ import annotations

import pathlib

import pytest

from doc_examples import (
    DOCUMENTS,
    ROOT,
    SKIPPED_COMMANDS,
    DocumentRun,
    code_blocks,
    shell_commands,
    skip_reason,
)

#: Documents whose blocks run in a test of their own, which checks what they do.
OWN_TESTS = {
    "README.md": "test_readme.py",
    "docs/manager.md": "test_docs_manager.py",
    "docs/session-format.md": "test_docs_examples.py",
    "docs/server.md": "test_docs_server.py",
    "docs/deployment.md": "test_docs_deployment.py",
}


def name(document: pathlib.Path) -> str:
    return str(document.relative_to(ROOT))


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if name(d) not in OWN_TESTS], ids=name)
def test_every_block_runs_as_written(
    document: pathlib.Path,
    model_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    run = DocumentRun(document, model_path)
    run.run_rest()
    capsys.readouterr()


def test_the_documents_with_their_own_test_exist() -> None:
    for document, test in OWN_TESTS.items():
        assert (ROOT / document).is_file() and (ROOT / "tests" / test).is_file()


def test_session_format_examples_leave_what_they_describe(
    model_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.chdir(tmp_path)
    run = DocumentRun(ROOT / "docs" / "session-format.md", model_path)
    run.run_rest()
    assert (tmp_path / "support.session").is_file()
    later = run.namespace["later"]
    ctx = run.namespace["ctx"]
    assert later.tokens[: len(ctx.tokens)] == ctx.tokens  # type: ignore[attr-defined]
    # Five CLI commands ran (and "$(llama-sessions fetch-model)" found the model).
    assert [c.args[2].split()[1] for c in run.commands] == [
        "inspect",
        "inspect",
        "inspect",
        "verify",
        "verify",
    ]
    assert run.commands[-1].stdout.startswith("OK: support.session loads with ")


def test_every_shell_command_is_run_or_skipped_by_the_rule() -> None:
    ran, skipped = [], set()
    for document in DOCUMENTS:
        for block in code_blocks(document):
            if block.language in ("bash", "sh"):
                for command in shell_commands(block.code):
                    reason = skip_reason(command)
                    if reason is None:
                        ran.append(command)
                    else:
                        skipped.add(next(m for m in SKIPPED_COMMANDS if m in command))
    assert ran and all(command.startswith(("llama-sessions ", "curl ")) for command in ran)
    assert skipped == set(SKIPPED_COMMANDS), "a skip rule that no command needs any more: remove it"
    with pytest.raises(AssertionError, match="neither a llama-sessions command nor skipped"):
        skip_reason("rm -rf sessions")


def test_blocks_are_found_with_their_language_and_line(tmp_path: pathlib.Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text(
        "# T\n\n```python\nx = 1\n```\n\ntext\n```rust,no_run\nlet a = 1;\n```\n", encoding="utf-8"
    )
    assert code_blocks(doc)[0].language == "python" and code_blocks(doc)[0].line == 4
    assert code_blocks(doc)[1].language == "rust" and code_blocks(doc)[1].code == "let a = 1;\n"
    assert shell_commands(
        "A=1 llama-sessions x \\\n  --y  # c\n# only a comment\nbash s.sh && llama-sessions z\n"
    ) == [
        "A=1 llama-sessions x    --y  # c",
        "bash s.sh",
        "llama-sessions z",
    ]
