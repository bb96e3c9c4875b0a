"""The typed example runs for real (mypy --strict checks it in scripts/lint.sh)."""

from __future__ import annotations

import pathlib

from typing_example import main


def test_typed_example_runs() -> None:
    main()


def test_sampling_defaults_have_one_home() -> None:
    """The defaults live in the Rust core (SAMPLING_DEFAULTS): the native signatures and the stub show
    ``...``, and the Python wrappers take their values from there."""
    import ast
    import inspect

    import llama_sessions
    from llama_sessions import SessionManager, _native

    assert _native.SAMPLING_DEFAULTS == {
        "max_tokens": 256,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "min_p": 0.05,
        "repeat_penalty": 1.0,
    }
    stub = pathlib.Path(llama_sessions.__file__).with_name("_native.pyi")
    shown = 0
    for node in ast.walk(ast.parse(stub.read_text())):
        if isinstance(node, ast.FunctionDef):
            args = node.args
            pairs = list(zip(args.args[len(args.args) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg in _native.SAMPLING_DEFAULTS:
                    assert isinstance(default, ast.Constant) and default.value is ..., (node.name, arg.arg)
                    shown += 1
    assert shown >= 5 * 6  # generate, stream, chat, stream_chat, generate_reusing_prefix
    for method in (SessionManager.achat, SessionManager.astream_chat):
        parameters = inspect.signature(method).parameters
        for name, value in _native.SAMPLING_DEFAULTS.items():
            assert parameters[name].default == value, (method.__name__, name)
