"""A typed usage example: `mypy --strict` checks it against the stub (it is also run by test_typing.py)."""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

from llama_sessions import (
    Context,
    ContextParams,
    GenerationStats,
    Model,
    SessionInfo,
    SessionParamsMismatchError,
    TokenStream,
    default_model_path,
    inspect_session,
)


def answer(model_path: Path, question: str) -> tuple[str, int, GenerationStats | None]:
    model: Model = Model.load(model_path, n_gpu_layers=0, use_mmap=True)
    params = ContextParams(n_ctx=512, n_batch=64, type_k="q8_0", type_v="q8_0", flash_attn=True)
    ctx = Context(model, params, n_threads=2)
    system: str = model.apply_chat_template([{"role": "system", "content": "Be brief."}], False)
    ctx.generate(system, max_tokens=0)
    prompt = model.apply_chat_template([{"role": "user", "content": question}])
    stream: TokenStream = ctx.stream(prompt, max_tokens=8, temperature=0.0, stop=["\n"])
    text = "".join(piece for piece in stream)
    tokens: list[int] = ctx.tokens
    ctx.truncate(len(tokens) - 1)
    return text, ctx.token_count(), ctx.last_stats


def resume(model_path: Path, directory: Path) -> tuple[int, datetime | None, dict[int, list[int]]]:
    model = Model.load(model_path)
    ctx = Context(model, n_ctx=512, n_batch=64, n_seq_max=2)
    ctx.generate("Once upon a time", max_tokens=4, temperature=0, seq=1)
    ctx.copy_sequence(1, 0)
    info: SessionInfo = ctx.save_session(directory / "s.session", metadata={"user": "ada", "turn": 1})
    snapshot: bytes = ctx.snapshot(seq=1)
    ctx.restore(snapshot, seq=0)
    ctx.load_session(directory / "s.session")
    later: Context = Context.from_session(model, directory / "s.session", n_threads=1)
    try:
        Context(model, n_ctx=256).load_session(directory / "s.session")
    except SessionParamsMismatchError as error:
        assert "n_ctx" in error.mismatches
    else:
        raise AssertionError("a session saved with n_ctx=512 loaded into a context of n_ctx=256")
    params: ContextParams | None = inspect_session(snapshot).params
    assert params is not None and params.n_seq_max == 2
    return later.token_count(seq=1) + info.total_bytes, info.created_at, info.sequences


def main() -> None:
    text, held, stats = answer(default_model_path(), "What is 2 + 2?")
    assert isinstance(text, str) and held > 0 and stats is not None
    assert stats.stop_reason in ("eog", "stop", "length", "context_full")
    with tempfile.TemporaryDirectory() as directory:
        size, created, sequences = resume(default_model_path(), Path(directory))
    assert size > 0 and created is not None and sorted(sequences) == [0, 1]


if __name__ == "__main__":
    main()
