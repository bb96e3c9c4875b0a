"""Model: loading, errors, metadata, tokenizer, chat template, fingerprint."""

from __future__ import annotations

import pathlib
import re
import shutil

import pytest

from llama_sessions import InvalidParameterError, Model, ModelLoadError, TokenizeError

from make_variant_model import make_not_gguf, make_truncated


def test_properties_describe_smollm2(model: Model, model_path: pathlib.Path) -> None:
    assert model.path == model_path
    assert model.architecture == "llama"
    assert model.n_vocab == 49152
    assert model.n_layer == 30
    assert model.n_embd == 576
    assert model.n_ctx_train == 8192
    assert model.metadata["general.architecture"] == "llama"
    assert model.chat_template is not None and "<|im_start|>" in model.chat_template
    assert model.fingerprint.startswith("blake3:") and len(model.fingerprint) == len("blake3:") + 32


def test_missing_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        Model.load(tmp_path / "nope.gguf")


def test_not_a_gguf_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "not.gguf"
    make_not_gguf(path)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Model.load(path)


@pytest.mark.parametrize(
    ("keep_bytes", "reason"),
    [
        (3, "truncated: magic needs 4 bytes"),
        (100, "truncated"),
        (2_000_000, "truncated"),
        (98_000_000, "truncated: the last tensor's data starts at offset"),
        # Cut inside the last tensor: only llama.cpp notices, and its own words (captured from its log by our
        # log callback) are the reason.
        (98_362_432 - 100, "tensor 'output_norm.weight' data is not within the file bounds"),
    ],
)
def test_truncated_gguf(
    model_path: pathlib.Path, tmp_path: pathlib.Path, keep_bytes: int, reason: str
) -> None:
    path = tmp_path / "truncated.gguf"
    make_truncated(model_path, path, keep_bytes)
    with pytest.raises(ModelLoadError, match=re.escape(reason)):
        Model.load(path)


def test_a_directory_is_not_a_model(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ModelLoadError, match="directory"):
        Model.load(tmp_path)


def test_negative_gpu_layers_are_refused(model_path: pathlib.Path) -> None:
    with pytest.raises(InvalidParameterError, match="n_gpu_layers"):
        Model.load(model_path, n_gpu_layers=-1)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "Grüße aus Köln — 東京タワー, emoji 🐉🏮 and ünïcödé.",
        "  leading spaces, tabs\tand\nnewlines  ",
    ],
)
def test_tokenize_detokenize_round_trip(model: Model, text: str) -> None:
    tokens = model.tokenize(text)
    assert all(isinstance(t, int) for t in tokens)
    assert model.detokenize(tokens) == text


def test_special_tokens_are_parsed_only_when_asked(model: Model) -> None:
    im_end = model.tokenize("<|im_end|>", add_bos=False, special=True)
    assert im_end == [2]
    as_text = model.tokenize("<|im_end|>", add_bos=False, special=False)
    assert len(as_text) > 1 and 2 not in as_text
    assert model.detokenize([2]) == ""
    assert model.detokenize([2], special=True) == "<|im_end|>"


def test_out_of_vocabulary_ids_are_refused(model: Model) -> None:
    with pytest.raises(TokenizeError, match="49152"):
        model.detokenize([1, model.n_vocab])
    with pytest.raises(TokenizeError):
        model.detokenize([-1])
    with pytest.raises(TokenizeError, match="32-bit"):
        model.detokenize([2**40])


def test_chat_template_two_turns(model: Model) -> None:
    prompt = model.apply_chat_template(
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ]
    )
    assert prompt == (
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello, how can I help?<|im_end|>\n"
        "<|im_start|>user\nTell me a joke.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = model.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=False)
    assert without == "<|im_start|>user\nHi!<|im_end|>\n"


@pytest.mark.parametrize(
    "messages",
    [[{"role": "user"}], [{"role": "user", "content": 3}], ["hello"]],
)
def test_malformed_messages_are_refused(model: Model, messages: list[object]) -> None:
    with pytest.raises(InvalidParameterError, match=r"messages\[0\]"):
        model.apply_chat_template(messages)  # type: ignore[arg-type]


def test_empty_conversation_is_just_the_generation_prompt(model: Model) -> None:
    assert model.apply_chat_template([]) == "<|im_start|>assistant\n"


def test_fingerprint_is_stable_across_loads_and_copies(
    model: Model, model_path: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(model_path, copy)
    assert Model.load(model_path).fingerprint == model.fingerprint
    assert Model.load(copy).fingerprint == model.fingerprint


def test_fingerprint_tells_other_weights_apart(model: Model, variant_model_path: pathlib.Path) -> None:
    variant = Model.load(variant_model_path)
    # llama.cpp sees the same model...
    assert variant.architecture == model.architecture
    assert variant.n_vocab == model.n_vocab and variant.n_layer == model.n_layer
    assert variant.metadata == model.metadata
    # ...we do not.
    assert variant.fingerprint != model.fingerprint
