"""Arguments of the wrong type get a typed error inside the hierarchy that names the argument, and values
are kept as given: metadata is never converted on the way, session bytes come in any buffer."""

from __future__ import annotations

import array
import math
import pathlib

import pytest

from llama_sessions import (
    Context,
    InvalidParameterError,
    LlamaSessionsError,
    Model,
    SessionManager,
    inspect_session,
)

EXPECTED = "expected a dict of JSON values (str keys; str, int, float, bool, None, list, dict values)"


@pytest.mark.parametrize(
    ("tokens", "found"),
    [
        ("abc", "str"),
        (b"ab", "bytes"),
        (7, "int"),
        ([1, 2.5], "a float at index 1"),
        ([True], "a bool at index 0"),
    ],
)
def test_detokenize_wants_a_list_of_int(model: Model, tokens: object, found: str) -> None:
    with pytest.raises(InvalidParameterError) as excinfo:
        model.detokenize(tokens)  # type: ignore[arg-type]
    assert isinstance(excinfo.value, LlamaSessionsError) and isinstance(excinfo.value, ValueError)
    assert str(excinfo.value) == f"invalid tokens: expected a list of int (token ids), found {found}"


def test_detokenize_takes_any_sequence_of_int(model: Model) -> None:
    ids = model.tokenize("Hello there", add_bos=False)
    assert model.detokenize(tuple(ids)) == model.detokenize(ids) == "Hello there"
    assert model.detokenize(range(0)) == ""


@pytest.mark.parametrize(
    ("metadata", "found"),
    [
        ({1: "a"}, "found the key 1 (int) in metadata"),
        ({"user": {("a", 1): 2}}, "found the key ('a', 1) (tuple) in metadata[\"user\"]"),
        ({"score": math.nan}, 'found metadata["score"] = nan: JSON has no NaN or infinity'),
        ({"scores": [1.0, -math.inf]}, 'found metadata["scores"][1] = -inf: JSON has no NaN or infinity'),
        ({"tags": {"a", "b"}}, 'found metadata["tags"] of type set'),
        (
            {"big": 2**70},
            f'found metadata["big"] = {2**70}, an int outside the 64-bit range JSON readers keep exactly',
        ),
        ([("a", 1)], "found list"),
    ],
)
def test_metadata_that_json_cannot_hold_exactly_is_refused(
    model: Model, tmp_path: pathlib.Path, metadata: object, found: str
) -> None:
    ctx = Context(model, n_ctx=256, n_batch=64)
    ctx.generate("Hello", max_tokens=0)
    message = f"invalid metadata: {EXPECTED}, {found}"
    for save in (
        lambda: ctx.snapshot(metadata=metadata),  # type: ignore[arg-type]
        lambda: ctx.save_session(tmp_path / "m.session", metadata=metadata),  # type: ignore[arg-type]
        lambda: SessionManager(model, tmp_path / "sessions", n_ctx=256).create_session(
            "ada",
            metadata=metadata,  # type: ignore[arg-type]
        ),
    ):
        with pytest.raises(InvalidParameterError) as excinfo:
            save()
        assert str(excinfo.value) == message
    assert not (tmp_path / "m.session").exists()


def test_metadata_values_keep_their_types(model: Model) -> None:
    ctx = Context(model, n_ctx=256, n_batch=64)
    metadata = {
        "n": 3,
        "x": 0.5,
        "big": 2**63,
        "neg": -(2**63),
        "ok": True,
        "none": None,
        "nested": {"l": [1, "a", (2, 3)]},
    }
    info = ctx.restore(ctx.snapshot(metadata=metadata))
    assert info.metadata == {**metadata, "nested": {"l": [1, "a", [2, 3]]}}
    assert (
        type(info.metadata["n"]) is int and type(info.metadata["x"]) is float and info.metadata["ok"] is True
    )


def test_session_bytes_come_in_any_buffer(model: Model) -> None:
    source = Context(model, n_ctx=256, n_batch=64)
    source.generate("The lighthouse keeper", max_tokens=4, temperature=0)
    data = source.snapshot()
    for buffer in (
        data,
        bytearray(data),
        memoryview(data),
        memoryview(bytearray(data))[:],
        array.array("B", data),
        memoryview(data + b"xx")[:-2],
    ):
        ctx = Context(model, n_ctx=256, n_batch=64)
        assert ctx.restore(buffer).token_count == len(source.tokens)  # type: ignore[arg-type]
        assert ctx.tokens == source.tokens
        assert inspect_session(buffer).token_count == len(source.tokens)  # type: ignore[arg-type]
    ctx = Context(model, n_ctx=256, n_batch=64)
    with pytest.raises(InvalidParameterError) as excinfo:
        ctx.restore("not bytes")  # type: ignore[arg-type]
    assert str(excinfo.value) == (
        "invalid data: expected bytes or another bytes-like object (bytearray, memoryview, ...), found str"
    )
    assert ctx.tokens == []
