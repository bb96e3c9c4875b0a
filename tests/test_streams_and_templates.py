"""Item 14 of issue 15, in part: streams say what they are (repr), apply_chat_template takes any sequence of
messages, and Model.tokenize says how Context.generate counts a prompt's tokens."""

from __future__ import annotations

import collections
import pathlib
import types
from collections.abc import Iterator, Mapping

import pytest

from llama_sessions import Context, InvalidParameterError, Model, SessionManager, StreamInvalidatedError

from conftest import SMALL

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
]


def test_a_token_stream_shows_its_progress_and_how_it_ended(model: Model) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    stream = ctx.stream("Once upon a time", max_tokens=3, temperature=0)
    assert repr(stream) == "TokenStream(seq=0, generated=0, max_tokens=3, state='running')"
    assert next(stream)
    assert repr(stream) == "TokenStream(seq=0, generated=1, max_tokens=3, state='running')"
    assert list(stream)
    assert ctx.last_stats is not None and ctx.last_stats.stop_reason == "length"
    assert (
        repr(stream) == "TokenStream(seq=0, generated=3, max_tokens=3, state='ended', stop_reason='length')"
    )


def test_a_token_stream_that_failed_says_so(model: Model) -> None:
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    stream = ctx.stream("Once upon a time", max_tokens=8, temperature=0)
    assert next(stream)
    ctx.generate(" and", max_tokens=0)  # changes the context under the stream
    with pytest.raises(StreamInvalidatedError):
        next(stream)
    assert repr(stream) == "TokenStream(seq=0, generated=1, max_tokens=8, state='failed')"


def test_a_chat_stream_shows_its_session_progress_and_state(model: Model, tmp_path: pathlib.Path) -> None:
    manager = SessionManager(model, tmp_path, n_ctx=512)
    manager.create_session("ada", "You are terse.")
    stream = manager.stream_chat("ada", "Name a color.", max_tokens=4, temperature=0)
    assert repr(stream) == "ChatStream(session='ada', pieces=0, max_tokens=4, state='running')"
    pieces = [next(stream)]
    assert repr(stream) == "ChatStream(session='ada', pieces=1, max_tokens=4, state='running')"
    pieces += list(stream)
    assert repr(stream) == f"ChatStream(session='ada', pieces={len(pieces)}, max_tokens=4, state='ended')"
    closed = manager.stream_chat("ada", "Name an animal.", max_tokens=4, temperature=0)
    assert next(closed)
    closed.close()
    assert repr(closed) == "ChatStream(session='ada', pieces=1, max_tokens=4, state='closed')"
    quoted = 'o\'neil "x"'
    manager.create_session(quoted)
    stream = manager.stream_chat(quoted, "Hi", max_tokens=1, temperature=0)
    assert repr(stream).startswith(f"ChatStream(session={quoted!r}, ")
    stream.close()


def as_generator(messages: list[dict[str, str]]) -> Iterator[dict[str, str]]:
    yield from messages


@pytest.mark.parametrize(
    "make",
    [
        tuple,
        as_generator,
        lambda ms: collections.deque(ms),
        lambda ms: [types.MappingProxyType(m) for m in ms],  # messages that are mappings, not dicts
        lambda ms: iter(ms),
    ],
    ids=["tuple", "generator", "deque", "mappings", "iterator"],
)
def test_apply_chat_template_takes_any_sequence_of_messages(model: Model, make: object) -> None:
    expected = model.apply_chat_template(MESSAGES)
    assert expected.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert model.apply_chat_template(make(MESSAGES)) == expected  # type: ignore[operator]


@pytest.mark.parametrize(
    ("messages", "found"),
    [
        ("hello", "found a str"),
        (b"hello", "found a bytes"),
        ({"role": "user", "content": "Hi!"}, r"found a single dict \(pass a list of messages\)"),
        (42, "found a int"),
    ],
)
def test_apply_chat_template_refuses_what_is_not_a_sequence_of_messages(
    model: Model, messages: object, found: str
) -> None:
    with pytest.raises(InvalidParameterError, match=r"^invalid messages: expected a sequence of .*" + found):
        model.apply_chat_template(messages)  # type: ignore[arg-type]


def test_a_bad_message_in_a_generator_is_named_by_its_index(model: Model) -> None:
    def messages() -> Iterator[Mapping[str, object]]:
        yield {"role": "user", "content": "Hi!"}
        yield {"role": "user"}

    with pytest.raises(InvalidParameterError, match=r'invalid messages\[1\]: .* found no "content" key'):
        model.apply_chat_template(messages())  # type: ignore[arg-type]


def test_tokenize_documents_that_generate_parses_special_text(model: Model) -> None:
    prompt = model.apply_chat_template([{"role": "user", "content": "Hi!"}])
    ctx = Context(model, **SMALL)  # type: ignore[arg-type]
    ctx.generate(prompt, max_tokens=0)
    # generate parses the markup: the context holds tokenize(..., special=True), not the default count.
    assert ctx.tokens == model.tokenize(prompt, special=True)
    assert len(model.tokenize(prompt)) > len(ctx.tokens)
    doc = Model.tokenize.__doc__ or ""
    assert "Context.generate" in doc and "special=True" in doc
    stub = (
        pathlib.Path(__file__).resolve().parent.parent / "python" / "llama_sessions" / "_native.pyi"
    ).read_text(encoding="utf-8")
    tokenize_doc = stub.split("def tokenize(", 1)[1].split("def detokenize(", 1)[0]
    assert (
        "``Context.generate`` and ``Context.stream`` tokenize their prompt with ``special=True``"
        in tokenize_doc
    )
