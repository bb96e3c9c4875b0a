"""Native core of llama_sessions (Rust, through PyO3). Import these names from ``llama_sessions``."""

from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Literal, final

__version__: str

KvType = Literal["f16", "q8_0", "q4_0"]
StopReason = Literal["eog", "stop", "length", "context_full"]

@final
class Model:
    """A GGUF model loaded by llama.cpp.

    Immutable and thread-safe: share one Model between many Contexts and threads.
    """

    @staticmethod
    def load(path: str | PathLike[str], *, n_gpu_layers: int = 0, use_mmap: bool = True) -> Model:
        """Load a GGUF model.

        Raises ModelLoadError for a missing, non-GGUF or truncated file, with the reason.
        """
    @property
    def path(self) -> Path:
        """The path the model was loaded from."""
    @property
    def architecture(self) -> str:
        """``general.architecture`` from the GGUF metadata, e.g. ``"llama"``."""
    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""
    @property
    def n_ctx_train(self) -> int:
        """The context length the model was trained with (the largest n_ctx a Context accepts)."""
    @property
    def n_layer(self) -> int:
        """Number of layers."""
    @property
    def n_embd(self) -> int:
        """Embedding width."""
    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF metadata, every value rendered as a string by llama.cpp."""
    @property
    def chat_template(self) -> str | None:
        """The model's chat template (Jinja source), or None."""
    @property
    def fingerprint(self) -> str:
        """A short string identifying the model's content.

        BLAKE3 over the whole GGUF header (metadata, tensor names, types, shapes) and a fixed sample of
        every tensor's data; see docs/fingerprint.md for what it does and does not detect.
        """
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Turn text into token ids.

        ``add_bos`` adds the beginning-of-sequence token if the model uses one; ``special`` parses
        special-token text such as ``"<|im_start|>"`` into control tokens (otherwise it is plain text).
        """
    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Turn token ids into text. ``special`` renders control tokens as their text.

        Raises TokenizeError for an id outside the vocabulary.
        """
    def apply_chat_template(
        self, messages: list[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Format ``[{"role": ..., "content": ...}, ...]`` with the model's chat template.

        Uses llama.cpp's built-in template engine (the common templates, not a full Jinja engine).
        Raises ChatTemplateError when the model has no usable template.
        """

@final
class ContextParams:
    """Parameters of a Context. Immutable; ``replace(**changes)`` returns a modified copy.

    Every field that shapes the saved state is explicit: ``flash_attn`` is True or False, never "auto".
    Out-of-range values raise InvalidParameterError (a ValueError) naming the parameter.
    """

    def __new__(
        cls,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        type_k: KvType = "f16",
        type_v: KvType = "f16",
        flash_attn: bool = False,
        n_seq_max: int = 1,
    ) -> ContextParams: ...
    def replace(
        self,
        *,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        type_k: KvType | None = None,
        type_v: KvType | None = None,
        flash_attn: bool | None = None,
        n_seq_max: int | None = None,
    ) -> ContextParams:
        """A copy with the given fields changed (None keeps a field as it is)."""
    @property
    def n_ctx(self) -> int:
        """Tokens the context holds (shared by all sequences)."""
    @property
    def n_batch(self) -> int:
        """Most tokens decoded per llama.cpp call; longer prompts are split."""
    @property
    def n_threads(self) -> int:
        """CPU threads used for decoding (default: the cores available)."""
    @property
    def type_k(self) -> KvType:
        """K cache type."""
    @property
    def type_v(self) -> KvType:
        """V cache type (a quantized V needs flash_attn=True)."""
    @property
    def flash_attn(self) -> bool:
        """Flash attention on or off."""
    @property
    def n_seq_max(self) -> int:
        """Independent sequences in the context."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class GenerationStats:
    """Counts and times of the last generation on a Context."""

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens decoded."""
    @property
    def prompt_seconds(self) -> float:
        """Seconds spent decoding the prompt."""
    @property
    def generated_tokens(self) -> int:
        """Tokens generated; all of them stay in the context."""
    @property
    def generation_seconds(self) -> float:
        """Seconds spent generating."""
    @property
    def stop_reason(self) -> StopReason:
        """Why the generation ended: "eog", "stop", "length" or "context_full"."""
    @property
    def prompt_tokens_per_second(self) -> float:
        """Prompt tokens per second."""
    @property
    def generation_tokens_per_second(self) -> float:
        """Generated tokens per second."""

@final
class TokenStream(Iterator[str]):
    """Text pieces of a generation in progress, from Context.stream().

    If another call changes the context between two steps, the next step raises StreamInvalidatedError.
    """

    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> str: ...

@final
class Context:
    """The KV cache of a model and the bookkeeping of what is in it.

    No call takes a position: each call continues where the context stands. One Context serves one call at
    a time (a second thread waits); many Contexts over one Model run in parallel. The GIL is released during
    native work, and Ctrl-C interrupts a long call with KeyboardInterrupt, keeping the tokens decoded so far.
    """

    def __new__(
        cls,
        model: Model,
        params: ContextParams | None = None,
        *,
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        type_k: KvType | None = None,
        type_v: KvType | None = None,
        flash_attn: bool | None = None,
        n_seq_max: int | None = None,
    ) -> Context:
        """Create a context over ``model`` with ``params`` (default ``ContextParams()``) changed by the
        keyword overrides (None keeps a field as it is).

        Raises InvalidParameterError naming the parameter for an invalid value or combination (n_ctx <= 0
        or above the model's n_ctx_train, a quantized V cache without flash attention, ...).
        """
    @property
    def model(self) -> Model:
        """The model this context reads with."""
    @property
    def params(self) -> ContextParams:
        """The parameters the context was created with."""
    @property
    def n_ctx(self) -> int:
        """Most tokens the context can hold."""
    @property
    def tokens(self) -> list[int]:
        """The token ids in the context, in position order."""
    @property
    def last_stats(self) -> GenerationStats | None:
        """Counts and times of the last generate() or finished stream(), or None."""
    def token_count(self) -> int:
        """How many tokens the context holds; the next token goes to this position."""
    def reset(self) -> None:
        """Empty the context."""
    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens and drop the rest; the next call continues at position ``n``.

        Raises InvalidParameterError when ``n`` is negative or above token_count().
        """
    def generate(
        self,
        prompt: str,
        max_tokens: int = 256,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> str:
        """Append ``prompt`` after what the context holds and generate up to ``max_tokens`` tokens.

        ``max_tokens=0`` only encodes the prompt. The BOS token is added only when the context is empty;
        special-token text in the prompt (as produced by apply_chat_template) becomes control tokens.
        Generation ends at an end-of-generation token, at any ``stop`` string (not part of the result), at
        ``max_tokens``, or when the context is full. Generated tokens stay in the context, so the next call
        continues after them. ``temperature=0`` is greedy and deterministic.

        Raises ContextFullError, before decoding anything, when the prompt does not fit; the context is then
        unchanged.
        """
    def stream(
        self,
        prompt: str,
        max_tokens: int = 256,
        *,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> TokenStream:
        """Like generate(), but yield text pieces as they are produced.

        The prompt is encoded by this call (ContextFullError is raised here, not on the first step). Pieces
        never split a multi-byte character and never contain (part of) a stop string.
        """
