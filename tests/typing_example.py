"""A typed usage example: `mypy --strict` checks it against the stub (it is also run by test_typing.py)."""

from __future__ import annotations

from pathlib import Path

from llama_sessions import Context, ContextParams, GenerationStats, Model, TokenStream, default_model_path


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


def main() -> None:
    text, held, stats = answer(default_model_path(), "What is 2 + 2?")
    assert isinstance(text, str) and held > 0 and stats is not None
    assert stats.stop_reason in ("eog", "stop", "length", "context_full")


if __name__ == "__main__":
    main()
