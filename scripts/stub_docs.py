"""The docstrings of ``llama_sessions/_native.pyi`` are copies of the native module's own docstrings.

The binding's Rust doc comments are the one home of the native API's documentation: PyO3 makes them the
runtime ``__doc__`` that ``help()`` shows, and this script copies them into the stub that editors and type
checkers read, so the two cannot drift apart.

    python3 scripts/stub_docs.py --check   # exit 1, naming each difference (run by scripts/lint.sh)
    python3 scripts/stub_docs.py --write   # rewrite the stub's docstrings from the built module

Run it with the package installed (scripts/install.sh). ``__new__`` has no docstring of its own in the stub:
PyO3 documents a constructor in its class's docstring, so that is where it goes.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

STUB = Path(__file__).resolve().parent.parent / "python" / "llama_sessions" / "_native.pyi"
MODULE = "llama_sessions._native"


@dataclass
class Documented:
    """A class, function or method of the stub and where its docstring is, or would go."""

    qualname: str
    node: ast.ClassDef | ast.FunctionDef
    docstring: ast.Expr | None

    @property
    def text(self) -> str | None:
        """The stub's docstring, cleaned as ``inspect`` cleans ``__doc__``."""
        if self.docstring is None:
            return None
        value = self.docstring.value
        assert isinstance(value, ast.Constant) and isinstance(value.value, str)
        return inspect.cleandoc(value.value)


def stub_items(tree: ast.Module) -> list[Documented]:
    """Every class, function and method of the stub, outermost first."""
    items: list[Documented] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                first = node.body[0]
                is_doc = (
                    isinstance(first, ast.Expr)
                    and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)
                )
                docstring = first if is_doc and isinstance(first, ast.Expr) else None
                items.append(Documented(prefix + node.name, node, docstring))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return items


def is_dunder(qualname: str) -> bool:
    """A method Python documents itself (``__eq__``); a constructor is documented by its class."""
    return "." in qualname and qualname.rsplit(".", 1)[1].startswith("__")


def runtime_doc(qualname: str) -> str | None:
    """The cleaned ``__doc__`` of a native object, or None when it has none of its own."""
    obj: object = importlib.import_module(MODULE)
    for part in qualname.split("."):
        holder = obj
        obj = inspect.getattr_static(holder, part) if isinstance(holder, type) else getattr(holder, part)
    if is_dunder(qualname):
        return None
    if isinstance(obj, staticmethod | classmethod):
        obj = obj.__func__
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def render(doc: str, indent: int) -> list[str]:
    """A docstring as the stub writes it (ruff format's layout)."""
    pad = " " * indent
    lines = doc.replace("\\", "\\\\").replace('"""', '\\"\\"\\"').splitlines()
    if len(lines) == 1:
        return [f'{pad}"""{lines[0]}"""']
    out = [f'{pad}"""{lines[0]}']
    out += [f"{pad}{line}" if line else "" for line in lines[1:]]
    out.append(f'{pad}"""')
    return out


def differences(items: list[Documented]) -> list[str]:
    """Every docstring of the stub that is not the native one, with both texts."""
    problems = []
    for item in items:
        name = item.qualname
        stub = item.text
        if name.endswith(".__new__"):
            if stub is not None:
                problems.append(f"{name}: document the constructor in the class's Rust doc comment instead")
            continue
        if is_dunder(name):
            continue
        try:
            native = runtime_doc(name)
        except AttributeError:
            problems.append(f"{name}: in the stub, not in the native module")
            continue
        if native != stub:
            problems.append(
                f"{name}: the stub's docstring differs from the Rust doc comment's\n"
                f"    stub:   {stub!r}\n    native: {native!r}"
            )
    return problems


def write(source: str, items: list[Documented]) -> str:
    """``source`` with every docstring replaced by (or given) the native one."""
    lines = source.splitlines()
    # Bottom-up, so that earlier line numbers stay valid.
    for item in sorted(items, key=lambda i: i.node.lineno, reverse=True):
        if is_dunder(item.qualname):
            if item.qualname.endswith(".__new__") and item.docstring is not None:
                start, end = item.docstring.lineno - 1, item.docstring.end_lineno or item.docstring.lineno
                lines[start:end] = [" " * (item.node.col_offset + 4) + "..."]
            continue
        native = runtime_doc(item.qualname)
        indent = item.node.col_offset + 4
        if item.docstring is not None:
            start, end = item.docstring.lineno - 1, item.docstring.end_lineno or item.docstring.lineno
            lines[start:end] = render(native, indent) if native else []
            continue
        if native is None:
            continue
        body = item.node.body[0]
        line = lines[body.lineno - 1].rstrip()
        if line.endswith(": ..."):  # `def f(...) -> T: ...`: the docstring replaces the `...`
            lines[body.lineno - 1] = line[: -len(" ...")]
            lines[body.lineno : body.lineno] = render(native, indent)
        else:
            lines[body.lineno - 1 : body.lineno - 1] = render(native, indent)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="fail when a docstring differs")
    mode.add_argument("--write", action="store_true", help="rewrite the stub's docstrings")
    args = parser.parse_args()
    source = STUB.read_text()
    items = stub_items(ast.parse(source))
    if args.write:
        STUB.write_text(write(source, items))
        # The stub's layout is ruff format's (lint checks it); the docstrings are what this script wrote.
        return subprocess.run([sys.executable, "-m", "ruff", "format", "--quiet", str(STUB)]).returncode
    problems = differences(items)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} docstrings differ: run python3 scripts/stub_docs.py --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
