"""Runs the code blocks of a Markdown document as written, in order: what tests/test_docs_examples.py,
tests/test_readme.py and tests/test_docs_manager.py use.

The rule, one per kind of block:

- ``python``: executed in one namespace per document, in the current directory (a test's temporary one).
- ``bash``/``sh``: each command (a line, continuation lines joined, ``a && b`` split in two) runs with bash in
  that directory and must exit 0, if its program (after any ``VAR=value`` assignments) is this project's CLI,
  ``llama-sessions``, or ``curl`` (stdin is empty, so ``chat`` quits at once). A command that installs,
  builds, tests, benchmarks, fuzzes or serves is skipped: it contains one of ``SKIPPED_COMMANDS``, each with
  its reason. Any other command fails the run, so that a new kind of command is classified, never ignored.
- ``json``: must parse.
- ``text``: what a command prints, not run (a test of that command compares it with what it prints).
- ``rust``: compiled as doctests of the crate (``rust/core/src/lib.rs`` includes the document; checked here).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Every document whose examples must run: the README and docs/*.md.
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: What a skipped shell command contains, and why it is not run by the tests.
SKIPPED_COMMANDS = {
    "scripts/install.sh": "installs system packages and builds the package (the setup the tests run under)",
    "scripts/test.sh": "runs the whole test suite, this test included",
    "scripts/fuzz.sh": "fuzzes for many minutes",
    "cargo run": "builds and runs a Rust example (scripts/test.sh builds the crate)",
    "cargo test": "the Rust tests, which scripts/test.sh runs",
    "maturin build": "builds a wheel (minutes)",
    "-m venv": "creates the benchmarks' environment",
    "pip install": "installs llama-cpp-python for the benchmarks, or the server's extra (minutes)",
    "tests/s3_server.py": "runs an S3 server until stopped: the tests start it on a free port",
    "redis-server": "starts a Redis server in the background: the tests start their own on a free port",
    "examples/two_workers.py": "runs against the Redis started before it: tests/test_remote_sessions.py runs "
    "it on the tests' Redis and S3 servers",
    "llama-sessions serve": "runs until stopped: tests/test_docs_server.py starts the server and runs the "
    "page's other blocks against it",
}
#: Programs whose commands run: the CLI, and curl (the server page's requests, run against a server).
RUN_PROGRAMS = ("llama-sessions", "curl")


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: its info string's language, its code, and the line its code starts on."""

    language: str
    code: str
    line: int


def code_blocks(document: pathlib.Path) -> list[Block]:
    """The fenced code blocks of ``document``, in order."""
    text = document.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```\s*$", text, re.M | re.S):
        info = match[1].strip()
        blocks.append(Block(info.split(",")[0] or "text", match[2], text.count("\n", 0, match.start(2)) + 1))
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, ``&&`` lists split, comments kept (bash
    ignores them), blank and comment-only lines dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        for command in line.split(" && "):
            if shlex.split(command, comments=True):
                commands.append(command.strip())
    return commands


def skip_reason(command: str) -> str | None:
    """The reason for a skipped command; None for a command of RUN_PROGRAMS (to run); AssertionError for
    any other."""
    for marker, reason in SKIPPED_COMMANDS.items():
        if marker in command:
            return reason
    words = shlex.split(command, comments=True)
    program = next(word for word in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word))
    if program in RUN_PROGRAMS:
        return None
    raise AssertionError(
        f"a shell command of the docs that is neither a llama-sessions command nor skipped: {command!r}; "
        "make it one, or add what it runs to SKIPPED_COMMANDS in tests/doc_examples.py with the reason"
    )


def rust_doctest_documents() -> set[str]:
    """The documents that rust/core/src/lib.rs includes as doctests."""
    lib = (ROOT / "rust" / "core" / "src" / "lib.rs").read_text(encoding="utf-8")
    return set(re.findall(r'#\[doc = include_str!\("\.\./\.\./\.\./(.+?)"\)\]', lib))


class DocumentRun:
    """Runs the blocks of one document in order, in the current directory, with the CLI of this Python."""

    def __init__(
        self, document: pathlib.Path, model_path: pathlib.Path, replacements: dict[str, str] | None = None
    ) -> None:
        """``replacements`` (text: by what) apply to every block's code before it runs: a server's port."""
        self.document = document
        self.blocks = code_blocks(document)
        for old, new in (replacements or {}).items():
            self.blocks = [dataclasses.replace(b, code=b.code.replace(old, new)) for b in self.blocks]
        self.namespace: dict[str, object] = {"__name__": "__doc_example__"}
        self.commands: list[subprocess.CompletedProcess[str]] = []
        self.skipped: list[str] = []
        self._next = 0
        # The console script installed next to this interpreter, and the tests' model.
        self._env = dict(
            os.environ,
            PATH=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")]),
            LLAMA_SESSIONS_MODEL=str(model_path),
        )

    def _where(self, block: Block) -> str:
        return f"{self.document.relative_to(ROOT)}:{block.line}"

    def _run(self, block: Block) -> None:
        if block.language == "python":
            # Line numbers of tracebacks are the document's.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(self.document), "exec"), self.namespace)
        elif block.language in ("bash", "sh"):
            for command in shell_commands(block.code):
                reason = skip_reason(command)
                if reason is not None:
                    self.skipped.append(command)
                    continue
                result = subprocess.run(
                    ["bash", "-c", command],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    env=self._env,
                    timeout=300,
                    check=False,
                )
                assert result.returncode == 0, f"{self._where(block)}: {command!r} failed:\n{result.stderr}"
                self.commands.append(result)
        elif block.language == "json":
            json.loads(block.code)
        elif block.language == "text":
            pass
        elif block.language == "rust":
            included = rust_doctest_documents()
            assert str(self.document.relative_to(ROOT)) in included, (
                f"{self._where(block)}: a Rust block that no doctest compiles: include the document in "
                "rust/core/src/lib.rs as SessionFormatDocExamples does"
            )
        else:
            raise AssertionError(f"{self._where(block)}: a block of unknown language {block.language!r}")

    def run_through_python(self, count: int) -> None:
        """Runs the blocks up to and including the ``count``-th Python block of the document."""
        python_blocks = [i for i, block in enumerate(self.blocks) if block.language == "python"]
        assert len(python_blocks) >= count, f"{self.document.name} has {len(python_blocks)} Python blocks"
        self._run_until(python_blocks[count - 1] + 1)

    def run_rest(self) -> None:
        """Runs every block not run yet."""
        self._run_until(len(self.blocks))

    def _run_until(self, end: int) -> None:
        while self._next < end:
            block = self.blocks[self._next]
            self._next += 1
            self._run(block)
