"""The native API's docstrings have one home, the binding's Rust doc comments; the stub carries copies."""

from __future__ import annotations

import ast
import inspect
import sys

from doc_examples import ROOT
from llama_sessions import Context, SessionManager
from llama_sessions import _native as native

sys.path.insert(0, str(ROOT / "scripts"))
import stub_docs

STUB = ROOT / "python" / "llama_sessions" / "_native.pyi"


def stub_doc(qualname: str) -> str | None:
    items = {item.qualname: item for item in stub_docs.stub_items(ast.parse(STUB.read_text()))}
    return items[qualname].text


def test_help_shows_what_editors_show() -> None:
    assert stub_docs.differences(stub_docs.stub_items(ast.parse(STUB.read_text()))) == []
    # The calls a new user meets first, in full at run time (help()), not a one-line summary.
    for qualname, obj in [
        ("SessionManager.chat", native.SessionManager.chat),
        ("Context.generate", Context.generate),
        ("Context.load_session", Context.load_session),
    ]:
        doc = inspect.getdoc(obj)
        assert doc is not None and doc == stub_doc(qualname)
        assert len(doc.splitlines()) >= 3, qualname
    # The constructor's documentation is its class's: help(SessionManager) shows it.
    assert "``overflow``" in (native.SessionManager.__doc__ or "")
    assert stub_doc("SessionManager.__new__") is None
    assert issubclass(SessionManager, native.SessionManager)


def test_a_stub_docstring_that_drifted_is_named() -> None:
    source = STUB.read_text().replace(
        '"""How many tokens sequence ``seq`` holds; the next token goes to this position."""',
        '"""How many tokens sequence ``seq`` holds."""',
    )
    assert source != STUB.read_text()
    problems = stub_docs.differences(stub_docs.stub_items(ast.parse(source)))
    assert [p.split(":")[0] for p in problems] == ["Context.token_count"]
    rewritten = stub_docs.write(source, stub_docs.stub_items(ast.parse(source)))
    assert stub_docs.differences(stub_docs.stub_items(ast.parse(rewritten))) == []
