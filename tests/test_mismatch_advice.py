"""A session saved with other parameters: the advice fits the API that refused it."""

from __future__ import annotations

import pathlib

import pytest

from llama_sessions import Context, Model, SessionManager, SessionParamsMismatchError

SYSTEM = "You are a terse assistant."


def test_context_loads_advise_from_session(model: Model, tmp_path: pathlib.Path) -> None:
    source = Context(model, n_ctx=512, n_batch=64)
    source.generate(SYSTEM, max_tokens=0)
    path = tmp_path / "a.session"
    source.save_session(path)
    ctx = Context(model, n_ctx=1024, n_batch=64)
    for load in (lambda: ctx.load_session(path), lambda: ctx.restore(path.read_bytes())):
        with pytest.raises(SessionParamsMismatchError) as excinfo:
            load()
        assert str(excinfo.value).endswith(
            "was saved with other context parameters: n_ctx saved 512, current 1024 (create the context with "
            "the saved parameters, e.g. with Context.from_session)"
        )
        assert excinfo.value.mismatches == {"n_ctx": (512, 1024)}


def test_manager_load_advises_the_managers_parameters(model: Model, tmp_path: pathlib.Path) -> None:
    SessionManager(model, tmp_path, n_ctx=512, n_batch=64, autosave=True).create_session("ada", SYSTEM)
    other = SessionManager(model, tmp_path, n_ctx=1024, n_batch=32, type_k="q8_0", flash_attn=True)
    with pytest.raises(SessionParamsMismatchError) as excinfo:
        other.load("ada")
    error = excinfo.value
    assert error.mismatches == {
        "n_ctx": (512, 1024),
        "n_batch": (64, 32),
        "type_k": ("f16", "q8_0"),
        "flash_attn": (False, True),
    }
    assert error.advice == (
        'open the SessionManager with the saved parameters (n_ctx=512, n_batch=64, type_k="f16", '
        "flash_attn=False)"
    )
    assert str(error).endswith(f"({error.advice})")
    assert "from_session" not in str(error)
    # Following the advice works.
    assert SessionManager(model, tmp_path, n_ctx=512, n_batch=64).load("ada").token_count() > 0
