"""Native core of llama_sessions (Rust, through PyO3). Import these names from ``llama_sessions``."""

import builtins
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Any, Literal, final

from typing_extensions import Buffer, disjoint_base

__version__: str
#: The llama.cpp build this module is compiled against (recorded in every session).
LLAMA_CPP_BUILD: str

#: The defaults of every generation call (``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
#: ``repeat_penalty``), from the Rust core, their one home: 256, 0.8, 40, 0.95, 0.05 and 1.0 today. Signatures
#: show them as ``...``.
SAMPLING_DEFAULTS: dict[str, Any]

KvType = Literal["f16", "q8_0", "q4_0"]
StopReason = Literal["eog", "stop", "length", "context_full"]
OverflowPolicy = Literal["drop_oldest", "error"]
SessionStorage = Literal["chunks", "files"]
SessionFileFormat = Literal["llama-sessions", "llama.cpp"]
MemoryKind = Literal["attention", "sliding_window", "hybrid", "recurrent"]

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
    def memory(self) -> MemoryKind:
        """How llama.cpp keeps the memory of a sequence: ``"attention"`` (one KV cache), ``"sliding_window"``
        (a full-attention cache and a window cache), ``"hybrid"`` (attention and recurrent layers) or
        ``"recurrent"``. See docs/architectures.md for what each supports.
        """
    @property
    def partial_truncation(self) -> bool:
        """Whether llama.cpp can cut a sequence back in place. When it cannot (recurrent state),
        ``Context.truncate`` decodes the kept tokens again from the start: still exact, at the cost of
        decoding them.
        """
    @property
    def n_swa(self) -> int:
        """The sliding window in tokens (0 without one)."""
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

        ``Context.generate`` and ``Context.stream`` tokenize their prompt with ``special=True`` (the caller
        writes the markup), so to count a prompt's tokens as they will, pass ``special=True``: with the
        default, each ``<|im_start|>`` of a templated prompt is several plain-text tokens instead of one.
        """
    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Turn token ids (a list, tuple or other sequence of int) into text. ``special`` renders control
        tokens as their text.

        Raises InvalidParameterError for anything but a sequence of int (a str is refused, not read as
        characters), TokenizeError for an id outside the vocabulary.
        """
    def apply_chat_template(
        self, messages: Iterable[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Format ``[{"role": ..., "content": ...}, ...]`` with the model's chat template.

        ``messages`` may be any sequence or iterable of such mappings (a list, a tuple, a generator); a str,
        bytes or a single mapping raises InvalidParameterError, as does a message without a str "role" and
        "content".

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
        """KV cells requested for the context, shared by all sequences: each holds at most
        ``n_ctx / n_seq_max`` tokens. llama.cpp rounds it up (to a multiple of 256 per sequence);
        ``Context.params.n_ctx`` is what it allocated.
        """
    @property
    def n_batch(self) -> int:
        """Most tokens decoded per llama.cpp call; longer prompts are split. llama.cpp clamps it to
        ``n_ctx``; ``Context.params.n_batch`` is what it applied.
        """
    @property
    def n_threads(self) -> int:
        """CPU threads used for decoding (default: the cores available; 1 to 512, llama.cpp's limit)."""
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
    """Counts and times of the last generation on a Context, or of the last chat turn on a SessionManager's
    session (``manager.load(session_id).last_stats``).
    """

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens decoded."""
    @property
    def context_tokens(self) -> int:
        """Tokens the sequence held when generation started: what the answer follows (for a chat, the whole
        formatted conversation). Those beyond ``prompt_tokens`` were not decoded by this call: the sequence
        already held them, or they were restored from a prefix cache.
        """
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
    def dropped_turns(self) -> int:
        """Whole turns (a user message and its answer) a SessionManager chat turn dropped from the start of
        the history to make room for itself (``overflow="drop_oldest"``); 0 for everything else.
        """
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
    def __repr__(self) -> str:
        """``TokenStream(seq=0, generated=3, max_tokens=32, state='running')``: the tokens generated so far;
        once the stream has ended, ``state='ended', stop_reason='length'`` (or another stop reason of
        GenerationStats), or ``state='failed'`` after an error."""

@final
class PrefixCache:
    """A cache of content-addressed KV chunks shared by Contexts (see docs/prefix-cache.md).

    A sequence's KV cache is cut into chunks of ``chunk_tokens`` tokens; a chunk's key is a BLAKE3 hash of
    its parent chunk's key, its token ids and everything that shapes its bytes (model fingerprint, KV types,
    flash attention, llama.cpp build, layout, ``namespace``). A chunk whose bytes fail their checks (length,
    checksum, key, layout) is removed and its prefix decoded again, never trusted.

    A cache in directory ``path`` (one ``.kvchunk`` file per chunk, created if missing), or in this
    process's memory without a path; at most ``max_bytes`` of chunks, the least recently used evicted
    first. Chunks of one ``namespace`` never match in another.

    Raises InvalidParameterError for ``max_bytes < 1``, ``chunk_tokens`` outside 1..65536 or a namespace
    over 1024 bytes; StorageError when the directory cannot be created or read.
    """

    def __new__(
        cls,
        path: str | PathLike[str] | None = None,
        *,
        max_bytes: int = 1073741824,
        chunk_tokens: int = 256,
        namespace: str = "",
    ) -> PrefixCache: ...
    @property
    def path(self) -> Path | None:
        """The directory of an on-disk cache; None in memory."""
    @property
    def chunk_tokens(self) -> int:
        """Tokens per chunk."""
    @property
    def namespace(self) -> str:
        """The namespace chunk keys are derived in."""
    @property
    def max_bytes(self) -> int:
        """The bound on the bytes of chunks kept."""
    def stats(self) -> dict[str, int]:
        """``entries``, ``bytes``, ``max_bytes``, and this process's ``hits``, ``misses``, ``corrupt`` (chunks
        found unsound and removed), ``puts`` and ``evictions``.
        """
    def gc(self) -> dict[str, int]:
        """Re-reads the directory, removes chunks whose bytes fail their checks and evicts down to
        ``max_bytes``: returns ``removed_corrupt``, ``evicted``, ``kept`` and ``bytes``.
        """
    def pin_sessions(self, session_dir: str | PathLike[str]) -> int:
        """Never evict (here or in gc()) the chunks that the sessions stored in ``session_dir`` name: what a
        SessionManager with ``storage="chunks"`` does for its own cache, for a tool that collects that cache
        by itself (``llama-sessions cache gc``). Holds for this PrefixCache object. Returns how many chunks
        the sessions name; InvalidParameterError if ``session_dir`` is not a directory.
        """
    def clear(self) -> int:
        """Removes every chunk; returns how many. Sessions whose manifests named them decode those tokens
        again when they are loaded.
        """
    def __repr__(self) -> str: ...

@final
class Context:
    """The KV cache of a model and the bookkeeping of what is in it.

    No call takes a position: each call continues where the context stands. One Context serves one call at
    a time (a second thread waits); many Contexts over one Model run in parallel. The GIL is released during
    native work, and Ctrl-C interrupts a long call with KeyboardInterrupt, keeping the tokens decoded so far.

    Create a context over ``model`` with ``params`` (default ``ContextParams()``) changed by the
    keyword overrides (None keeps a field as it is).

    With ``prefix_cache``, every generate/encode first restores the longest chain of cached chunks that
    prefixes what the sequence will hold (beyond what it holds), decodes only the rest, and offers every
    full chunk it holds to the cache (``last_stats.prompt_tokens`` counts only the decoded tokens). Only
    models whose memory is one plain KV cache use it; others ignore it.

    Raises InvalidParameterError naming the parameter for an invalid value or combination (n_ctx <= 0
    or above the model's n_ctx_train, a quantized V cache without flash attention, ...).
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
        prefix_cache: PrefixCache | None = None,
    ) -> Context: ...
    @property
    def model(self) -> Model:
        """The model this context reads with."""
    @property
    def params(self) -> ContextParams:
        """The parameters the context was created with, ``n_ctx`` and ``n_batch`` as llama.cpp allocated them
        (``Context(model, n_ctx=300).params.n_ctx == 512``, and ``n_batch`` 300): what sessions record and
        compare.
        """
    @property
    def n_ctx(self) -> int:
        """KV cells of the context as llama.cpp allocated them (``params.n_ctx``), shared by all sequences.

        llama.cpp gives each sequence an equal share that is a multiple of 256: ``n_ctx=300`` holds 512,
        ``n_ctx=512, n_seq_max=4`` holds 1024 (256 per sequence). See n_ctx_per_seq.
        """
    @property
    def n_ctx_per_seq(self) -> int:
        """Most tokens one sequence holds: ``n_ctx // n_seq_max`` (``n_ctx`` itself with one sequence).
        ContextFullError is raised against this.
        """
    @property
    def n_seq_max(self) -> int:
        """Independent sequences in the context (``seq`` arguments run from 0 to n_seq_max - 1)."""
    @property
    def tokens(self) -> list[int]:
        """The token ids in sequence 0, in position order."""
    def sequence_tokens(self, seq: int) -> list[int]:
        """The token ids in sequence ``seq``, in position order."""
    @property
    def last_stats(self) -> GenerationStats | None:
        """Counts and times of the last generate() or finished stream() on this context, or None (also after
        reset(), restore() and load_session(), which replace what they described). For a SessionManager's
        session (a Context from load()), the last chat turn's too, whoever ran it; a session read from its
        file has None until its next turn.
        """
    def token_count(self, seq: int = 0) -> int:
        """How many tokens sequence ``seq`` holds; the next token goes to this position."""
    def reset(self) -> None:
        """Empty every sequence of the context."""
    def truncate(self, n: int, *, seq: int = 0) -> None:
        """Keep the first ``n`` tokens of sequence ``seq`` and drop the rest; the next call continues at
        position ``n``.

        Where the memory cannot be cut back in place (recurrent and hybrid models, see
        ``Model.partial_truncation``; a sliding-window model restored from a state, below its last token),
        the sequence is emptied and its first ``n`` tokens are decoded again: the result is exactly what a
        fresh context that decoded them holds, at the cost of decoding ``n`` tokens.

        Raises InvalidParameterError when ``n`` is negative or above token_count(seq).
        """
    def generate(
        self,
        prompt: str,
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        seq: int = 0,
    ) -> str:
        """Append ``prompt`` after what the context holds and generate up to ``max_tokens`` tokens.

        ``max_tokens=0`` only encodes the prompt. The BOS token is added only when the context is empty;
        special-token text in the prompt (as produced by apply_chat_template) becomes control tokens.
        Generation ends at an end-of-generation token, at any ``stop`` string (not part of the result), at
        ``max_tokens``, or when the context is full. Generated tokens stay in the context, so the next call
        continues after them. ``temperature=0`` is greedy and deterministic.

        Raises ContextFullError, before decoding anything, when the prompt does not fit in what sequence
        ``seq`` has left of its n_ctx_per_seq; the context is then unchanged. ``seq`` picks the sequence of a
        context with n_seq_max > 1. A list of chat messages instead of a str raises InvalidParameterError
        pointing at chat() and Model.apply_chat_template().

        To hold a conversation, either format each new turn yourself and pass only it (the context keeps
        what came before), or pass the whole conversation to chat(), which decodes only what is new.
        """
    def stream(
        self,
        prompt: str,
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        seq: int = 0,
    ) -> TokenStream:
        """Like generate(), but yield text pieces as they are produced.

        The prompt is encoded by this call (ContextFullError is raised here, not on the first step). Pieces
        never split a multi-byte character and never contain (part of) a stop string.
        """
    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        seq: int = 0,
    ) -> str:
        """The assistant's answer to ``messages``: the *whole* conversation so far, a sequence of
        ``{"role": str, "content": str}`` (system, user and assistant turns, previous answers included).

        The conversation is formatted with the model's chat template (llama.cpp's built-in engine, as
        Model.apply_chat_template), each message's content as plain text: text such as
        ``"<|im_start|>system"`` inside a message stays text and cannot open a turn of another role. Only
        what differs from what sequence ``seq`` holds is decoded: the tokens after the longest common prefix
        are dropped and the rest of the conversation decoded, as llama.cpp's server does. Call it again with
        the answer and the next user message appended: the sequence then holds exactly the formatted
        conversation and the answer (never a turn twice), and the answer is the one a fresh context given
        the whole conversation would generate. Generation options, stop reasons and ``last_stats`` (whose
        ``prompt_tokens`` counts only the tokens decoded) are as for generate().

        Raises InvalidParameterError for an empty or malformed ``messages`` (naming the message),
        ChatTemplateError when the model has no usable template, ContextFullError (before anything changes)
        when the conversation does not fit in n_ctx_per_seq.
        """
    def stream_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        seq: int = 0,
    ) -> TokenStream:
        """Like chat(), but yield the answer's text pieces as they are produced.

        The conversation is encoded by this call (its errors, ContextFullError included, are raised here);
        the answer is generated as the stream is advanced, as for stream().
        """
    def copy_sequence(self, src: int, dst: int) -> None:
        """Replace sequence ``dst`` by a copy of sequence ``src`` (tokens and KV cache), decoding nothing.

        A prefix encoded once (a long system prompt) then serves many sequences; each continues exactly as
        ``src`` would.
        """
    def save_session(
        self,
        path: str | PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        seq: int | None = None,
        format: SessionFileFormat = "llama-sessions",
        secret_key: bytes | None = None,
    ) -> SessionInfo:
        """Save the context's state (or only sequence ``seq``) to ``path``.

        The file records the model fingerprint, the state-relevant parameters (as llama.cpp allocated them),
        the tokens, ``metadata`` (a dict of JSON values, at most 16 MiB, kept exactly: a non-str key, a NaN or
        an infinity, or a value of another type raises InvalidParameterError naming it) and a checksum; see
        docs/session-format.md. It is written to a
        temporary file, fsynced and renamed over ``path``: a crash leaves the old file or the new one; an OS
        error (a full disk, a read-only directory) raises a StorageError, which is also an OSError.
        With ``secret_key`` (bytes, at least 16) the session is signed: a keyed BLAKE3 MAC over the whole
        file, which only the same key verifies (see docs/reliability.md).
        ``format="llama.cpp"`` writes llama.cpp's own session file instead (what ``llama_state_save_file``
        writes), for a context with n_seq_max == 1.
        """
    def load_session(
        self, path: str | PathLike[str], *, seq: int | None = None, secret_key: bytes | None = None
    ) -> SessionInfo:
        """Replace the context's state by the session at ``path``; the next call continues after its tokens.

        Everything is checked before llama.cpp sees a byte: SessionCorruptError (not a session, truncated,
        changed, or llama.cpp state whose cell records or sizes do not match the recorded tokens and this
        context), SessionModelMismatchError (another model or other weights), SessionParamsMismatchError (a
        state-relevant parameter differs), SessionVersionError (newer format, other llama.cpp build),
        SessionSignatureError (with ``secret_key``: unsigned, modified, or signed with another key; without:
        the session is signed). A failed load leaves the context exactly as it was. With ``seq``, the file
        must hold one sequence, which replaces sequence ``seq``; without, every other sequence is emptied. A
        llama.cpp session file is loaded too, with a SessionInteropWarning, after the same checks of its
        state.
        """
    def snapshot(
        self,
        *,
        seq: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        secret_key: bytes | None = None,
    ) -> bytes:
        """The context's state (or sequence ``seq``) as session bytes, in the file format; signed with
        ``secret_key`` if given.

        Store them anywhere (memory, a database, another process) and give them to restore(): cheap enough for
        undo checkpoints.
        """
    def restore(
        self, data: Buffer, *, seq: int | None = None, secret_key: bytes | None = None
    ) -> SessionInfo:
        """Replace the context's state by session bytes from snapshot() or a file, with the checks of
        load_session(); a failed restore leaves the context exactly as it was.

        ``data`` is ``bytes`` or any object of the buffer protocol (bytearray, memoryview, mmap, ...: copied
        once); anything else raises InvalidParameterError. A SessionParamsMismatchError advises
        Context.from_session (or a context created with the saved ``params``).
        """
    @staticmethod
    def from_session(
        model: Model,
        path: str | PathLike[str],
        *,
        n_threads: int | None = None,
        secret_key: bytes | None = None,
    ) -> Context:
        """Create a Context with the parameters recorded in the session at ``path`` and load it.

        Raises the errors of load_session(); InvalidParameterError for a llama.cpp session file (it records
        no parameters).
        """

@final
class SessionInfo:
    """What a session holds, read from its verified header (see inspect_session())."""

    @property
    def format(self) -> SessionFileFormat:
        """ "llama-sessions", or "llama.cpp" for llama.cpp's own session file."""
    @property
    def format_version(self) -> int:
        """Version of that format."""
    @property
    def chunks(self) -> int | None:
        """For a chunk manifest (how a SessionManager stores a session by default), how many KV chunks it
        names in the manager's chunk store; None for a session in one file.
        """
    @property
    def library_version(self) -> str | None:
        """Version of llama-sessions that wrote it (None for a llama.cpp file)."""
    @property
    def llama_cpp_build(self) -> str | None:
        """The llama.cpp build whose state layout the bytes have (None for a llama.cpp file)."""
    @property
    def created_at(self) -> datetime | None:
        """When it was written, an aware UTC datetime (None for a llama.cpp file)."""
    @property
    def model_fingerprint(self) -> str | None:
        """Fingerprint of the model it belongs to (None for a llama.cpp file)."""
    @property
    def model_name(self) -> str | None:
        """``general.name`` of that model, if it has one."""
    @property
    def model_architecture(self) -> str | None:
        """Architecture of that model (None for a llama.cpp file)."""
    @property
    def model_file_name(self) -> str | None:
        """File name the model was loaded from."""
    @property
    def params(self) -> ContextParams | None:
        """The parameters it was saved with (n_threads is this machine's default); None for a llama.cpp
        file.
        """
    @property
    def sequences(self) -> dict[int, list[int]]:
        """The tokens of each saved sequence, by sequence id."""
    @property
    def token_count(self) -> int:
        """Tokens held, over all sequences."""
    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata given to save_session() or snapshot()."""
    @property
    def header_bytes(self) -> int:
        """Bytes of header."""
    @property
    def state_bytes(self) -> int:
        """Bytes of llama.cpp state: the KV cache rows of the tokens held, nothing else."""
    @property
    def total_bytes(self) -> int:
        """Bytes of the whole session."""
    @property
    def signed(self) -> bool:
        """Whether the session is signed (loading it needs the secret_key it was signed with)."""

def inspect_session(source: str | PathLike[str] | Buffer, *, secret_key: bytes | None = None) -> SessionInfo:
    """Read and verify a session file or session bytes without a model.

    A llama-sessions session is checked completely (SessionCorruptError, SessionVersionError); a signed one
    by its checksum, and by its signature when ``secret_key`` is given (SessionSignatureError). Of a
    llama.cpp session file only the header can be checked.
    """

@final
class StoredSession:
    """One stored session, as SessionManager.list() reports it. A file that cannot be read is listed with
    ``error`` set and the other fields None.
    """

    @property
    def id(self) -> str:
        """The session id."""
    @property
    def file_size(self) -> int:
        """Bytes of its file."""
    @property
    def token_count(self) -> int | None:
        """Tokens held."""
    @property
    def created_at(self) -> datetime | None:
        """When the session was created (aware UTC datetime)."""
    @property
    def updated_at(self) -> datetime | None:
        """When it was last saved (aware UTC datetime)."""
    @property
    def version(self) -> int | None:
        """The stored version: 1 after the first save, +1 per save."""
    @property
    def message_count(self) -> int | None:
        """Chat messages in its history."""
    @property
    def metadata(self) -> dict[str, Any] | None:
        """The metadata given to create_session()."""
    @property
    def error(self) -> str | None:
        """Why the file could not be read (a corrupt file is reported here, not raised)."""

@final
class ChatStream(Iterator[str]):
    """The answer of a chat turn, piece by piece, from SessionManager.stream_chat(). When it ends, the user
    message and the answer join the session's history (and the session is saved if the manager autosaves).

    Until it ends, is closed or is dropped, the stream holds its session's turn: other turns on the session
    wait for it, and the session is not evicted.
    """

    def __iter__(self) -> ChatStream: ...
    def __next__(self) -> str: ...
    def __repr__(self) -> str:
        """``ChatStream(session='ada', pieces=3, max_tokens=48, state='running')``: the pieces read so far,
        and the state: ``'running'``, ``'ended'`` (the turn joined the history), ``'closed'`` or
        ``'failed'``."""
    @property
    def stats(self) -> GenerationStats | None:
        """The turn's GenerationStats once the stream has ended and the turn joined the history (None before,
        and for a stream closed or failed): the same as ``load(session_id).last_stats`` then, but never
        another turn's.
        """
    def close(self) -> None:
        """End the turn now and free the session: the answer so far stays in the context but does not join
        the history. Closing an ended stream does nothing.
        """

@disjoint_base
class SessionManager:
    """Many named, persistent sessions for many users on one model. Use ``llama_sessions.SessionManager``
    (this class plus asyncio variants).

    Manage the sessions in ``session_dir`` (created if missing); every session's context uses
    ``params`` changed by the overrides. At most ``max_live`` sessions stay loaded (a session leaving
    memory is saved first if it changed, with or without autosave).

    ``session_dir`` may also be a store URL shared by every worker that opens it:
    ``"redis://[:PASSWORD@]HOST[:PORT][/DB]"`` (Redis or Valkey; ``rediss://`` over TLS, the server's
    certificate checked against the system's authorities or those in ``$SSL_CERT_FILE``), or
    ``"s3://BUCKET[/PREFIX][?OPTION=VALUE&...]"`` (S3-compatible object storage that supports conditional
    writes; endpoint, region and credentials from the ``AWS_*`` environment variables or the URL's
    options, such as ``endpoint``, ``region``, ``allow_http``). A session's lock there is a lease that runs
    out after 30 seconds if its worker dies, and every save is version-checked under it (a lost race
    raises SessionConflictError and writes nothing). With ``storage="chunks"`` (the default) their KV
    chunks are in the same store, shared by every worker and never evicted by one; a ``prefix_cache``
    given then is this worker's local tier in front of them (chunks read from the store are kept there,
    within its ``max_bytes``). ``"file://DIR"`` is the directory DIR. RemoteStoreError when the store
    cannot be reached; InvalidParameterError for a URL that is not one.

    ``autosave`` (default True): every turn that changes a session (chat, stream_chat once the stream
    ends, revert, trim_history) saves it before returning. With ``autosave=False`` sessions are saved by
    save() and when they are evicted; what is still unsaved when the manager is garbage-collected or the
    interpreter exits is lost, with an UnsavedSessionsWarning naming the sessions.

    ``overflow``: what a chat turn does when its conversation plus the ``max_tokens`` reserved for the
    answer do not fit in ``n_ctx``. "drop_oldest" (default) drops the oldest whole turns from the history,
    keeping the system prompt, until it fits (the turn's ``last_stats.dropped_turns`` counts them);
    "error" raises ContextFullError before the turn starts, changing nothing (then call trim_history()).
    Either way ContextFullError, nothing changed, when the system prompt, the message and ``max_tokens``
    alone do not fit. InvalidParameterError for any other value.

    With ``secret_key`` (bytes, at least 16) every session and checkpoint is signed as it is written, and
    one that is unsigned, modified or signed with another key raises SessionSignatureError when it is
    loaded (see docs/reliability.md).

    ``storage``: how sessions are stored. "chunks" (default): each session is a manifest naming its KV
    chunks in a PrefixCache on disk, so that what sessions share (a system prompt, a document) is stored
    once and computed once: every session context shares that cache, and a chat turn restores the longest
    chain of full chunks any session computed for the same tokens and decodes only the rest. The cache is
    ``prefix_cache`` if given (it must be on disk: PrefixCache(path)), else ``PrefixCache(session_dir /
    "chunks")``; the chunks stored sessions name are never evicted. Sessions stored as one file are read
    and written as manifests at their next save; export() writes a session as one file. "files": one
    session file per session, as Context.save_session() writes them; ``prefix_cache`` (in memory or on
    disk) is then only shared for prompts. Models whose memory is not one plain KV cache always use files.
    See docs/prefix-cache.md.

    ``batching=True`` runs the live sessions as the ``max_live`` sequences of one llama.cpp context,
    allocated at once (``max_live`` x ``n_ctx`` cells): the turns of sessions chatting at the same time, from
    several threads or asyncio tasks, are decoded together, one batch per step, and a long prompt is read
    at most 128 tokens per step while others generate. Each session's Context and its files stay exactly
    what they are without batching. Models whose memory is not one plain KV cache keep a context per
    session. See docs/manager.md.

    ``kv_cells`` (with ``batching=True``): the live sessions share one KV cache of this many cells (rounded up
    to a multiple of 256) instead of ``n_ctx`` cells each, so memory follows what they hold. A turn reserves
    the cells of its conversation and ``max_tokens`` before it starts, and when the cache is full the least
    recently used idle session is saved and evicted to make room; ContextFullError when the sessions in
    turns hold the rest. Each token's attention then walks every cell in use, so steps are slower than with
    a stream per session (docs/benchmarks.md measures both).
    """

    def __new__(
        cls,
        model: Model,
        session_dir: str | PathLike[str] = "./sessions",
        params: ContextParams | None = None,
        *,
        max_live: int = 8,
        autosave: bool = True,
        overflow: OverflowPolicy = "drop_oldest",
        n_ctx: int | None = None,
        n_batch: int | None = None,
        n_threads: int | None = None,
        type_k: KvType | None = None,
        type_v: KvType | None = None,
        flash_attn: bool | None = None,
        secret_key: bytes | None = None,
        prefix_cache: PrefixCache | None = None,
        storage: SessionStorage = "chunks",
        batching: bool = False,
        kv_cells: int | None = None,
    ) -> SessionManager: ...
    @property
    def model(self) -> Model:
        """The model."""
    @property
    def session_dir(self) -> Path | None:
        """The directory of the session files; None for a remote store (see ``location``)."""
    @property
    def location(self) -> str:
        """Where the sessions are: the directory, or the remote store's URL (no password, no options)."""
    @property
    def params(self) -> ContextParams:
        """The parameters of every session's context."""
    @property
    def batching(self) -> bool:
        """Whether the live sessions run as sequences of one context, decoded together (``batching=True``, for
        a model whose memory is one plain KV cache).
        """
    @property
    def kv_cells(self) -> int | None:
        """The KV cells the live sessions share (``kv_cells``, rounded up as allocated); None when each has
        ``n_ctx`` cells of its own.
        """
    @property
    def storage(self) -> SessionStorage:
        """How sessions are stored: "chunks" (manifests naming chunks in prefix_cache) or "files"."""
    def export(self, session_id: str, path: str | PathLike[str]) -> SessionInfo:
        """Write session ``session_id`` (its live copy, unsaved changes included, or what is stored) as one
        session file at ``path``, atomically: the single-file format of Context.save_session(), which any
        Context of the manager's parameters loads without the chunk store (signed with the manager's
        secret_key, if it has one). Returns the file's SessionInfo. What the shell's ``llama-sessions export
        ID FILE`` does.
        """
    @property
    def prefix_cache(self) -> PrefixCache | None:
        """The PrefixCache every session's context shares (None: none)."""
    @property
    def max_live(self) -> int:
        """Most sessions kept loaded in memory."""
    @property
    def autosave(self) -> bool:
        """Whether every turn that changes a session saves it as it ends."""
    @property
    def overflow(self) -> OverflowPolicy:
        """What a chat turn that does not fit does: "drop_oldest" or "error"."""
    def unsaved_sessions(self) -> builtins.list[str]:
        """Ids of the live sessions whose changes are not stored yet (least recently used first): what would
        be lost if the manager went now. Always empty with autosave, unless a Context from load() was changed
        directly.
        """
    @property
    def stats(self) -> dict[str, int]:
        """Counters: prefill_tokens (system-prompt tokens decoded), prefix_reuses (sessions that restored an
        encoded system prompt instead), store_loads, store_saves, evictions, recomputed_tokens (tokens
        decoded again while loading, because a chunk a manifest names was missing or damaged); with
        batching, batch_steps (decode steps of the shared context) and max_sessions_in_step (0 without).
        """
    def create_session(
        self, session_id: str, system_prompt: str | None = None, *, metadata: Mapping[str, Any] | None = None
    ) -> Context:
        """Create a session starting from ``system_prompt`` (formatted with the model's chat template), store
        it and return its live Context. A system prompt this manager encoded before is restored, not decoded;
        the Context's ``last_stats`` are then that encoding (``prompt_tokens``: what was decoded, 0 when it
        was restored).

        Raises SessionExistsError for an existing id, InvalidParameterError (a ValueError) for an invalid id:
        1 to 128 bytes, no "/", "\\", ":", "@" or control characters, not starting with a dot.
        """
    def load(self, session_id: str) -> Context:
        """The live Context of a session: from memory, or read, verified and restored from the store. A live
        copy costs one small read (the stored version): when another process or worker has saved a newer
        version (or deleted the session) since, and the copy has no change of its own, the stored version is
        read instead, so that no manager sharing a store returns an outdated session. A copy that a turn
        holds is returned as it is.

        What is done through it (generate, truncate, restore, ...) is part of the session: saved by save() and
        before the session is evicted. It bypasses the turn order, like any shared Context.

        Raises SessionNotFoundError for an unknown id and the SessionError subclasses of Context.load_session;
        a SessionParamsMismatchError advises opening the manager with the saved parameters.
        """
    def load_or_create(self, session_id: str, system_prompt: str | None = None) -> Context:
        """load(), or create_session() when the session does not exist."""
    def save(self, session_id: str, context: Context | None = None) -> None:
        """Save a session's live copy; raises SessionConflictError (writing nothing) if the stored version
        changed since that copy was loaded: the stale copy then leaves memory, so the next load() reads the
        stored version. A stored session that is not live has nothing unsaved: saving it does nothing.
        SessionNotFoundError if there is no such session.

        With ``context`` (not the live one), store that context under the id instead, replacing what is stored
        (an existing session's history, system prompt and metadata are kept); SessionBusyError, writing
        nothing, if a turn holds the live copy.
        """
    def delete(self, session_id: str) -> None:
        """Delete a session, its checkpoints and their lock files (SessionNotFoundError if there is none)."""
    def exists(self, session_id: str) -> bool:
        """Whether the session exists (live or stored)."""
    def list(self) -> builtins.list[StoredSession]:
        """Every stored session, sorted by id. Files that are not sessions are ignored; a corrupt session file
        is listed with its error.
        """
    def session_path(self, session_id: str) -> Path:
        """The file of a session."""
    def history(self, session_id: str) -> builtins.list[dict[str, str]]:
        """The conversation after the system prompt: ``[{"role": ..., "content": ...}, ...]``, as load() gives
        it (the stored version when another process or worker saved a newer one).
        """
    def system_prompt(self, session_id: str) -> str | None:
        """The system prompt the session started from."""
    def chat(
        self,
        session_id: str,
        user_message: str,
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """One chat turn: the conversation is formatted with the model's chat template, only what the context
        does not hold yet is decoded, the answer is generated and both messages join the history (saved when
        the manager autosaves). Returns the answer; its stats (stop reason, token counts, times, turns
        dropped) are then ``load(session_id).last_stats``.

        Room for ``max_tokens`` is reserved before anything is decoded: when the conversation and
        ``max_tokens`` do not fit in ``n_ctx``, the manager's ``overflow`` policy drops the oldest turns or
        raises ContextFullError, changing nothing (see the constructor).

        A turn holds its session until it ends. If another turn holds it (a chat in another thread, or a
        stream_chat stream not exhausted, closed or dropped yet), this call waits for it: without limit when
        ``timeout`` is None (Ctrl-C ends the wait), else at most ``timeout`` seconds (0: not at all), then
        raises SessionBusyError. Turns on one session from several threads thus take turns.
        """
    def stream_chat(
        self,
        session_id: str,
        user_message: str,
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        """Like chat(), the answer arriving piece by piece; the overflow policy applies before the stream is
        returned. The stream holds the session's turn until it is exhausted, closed or dropped; ``timeout``
        bounds the wait for a turn in progress, as in chat(). Once exhausted, the turn's stats are
        ``load(session_id).last_stats``.
        """
    def chat_messages(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """One chat turn on a whole conversation, as an OpenAI-style client sends it every time:
        ``messages`` (an optional first "system" message, the history, and last the new "user" message, each
        a mapping with str "role" and "content") replaces the session's system prompt and history. Only what
        follows the longest common prefix of its tokens with what the context holds is decoded (a
        conversation that continues the stored one decodes only its new messages; an edited one, from the
        first token that differs); the answer is generated and joins the history. Returns the answer; its
        stats are then ``load(session_id).last_stats`` (``context_tokens``: the whole conversation's tokens,
        ``prompt_tokens``: those decoded).

        InvalidParameterError, before anything changes, for an empty conversation, one whose last message is
        not the user's, or a role that is not a plain name (1 to 32 ASCII letters, digits, "_" or "-": a role
        is markup and cannot carry control tokens). The overflow policy, the wait for a turn in progress
        (``timeout``) and autosave are as in chat().
        """
    def stream_chat_messages(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> ChatStream:
        """Like chat_messages(), the answer arriving piece by piece; the conversation is checked and the
        overflow policy applied before the stream is returned. The conversation replaces the session's when
        the stream ends; a stream closed or dropped before changes no history (the answer so far stays in the
        context, and the next turn reuses what it shares). ``timeout`` as in chat().
        """
    def generate_reusing_prefix(
        self,
        session_id: str,
        prompt: str,
        max_tokens: int = ...,
        *,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        min_p: float = ...,
        repeat_penalty: float = ...,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> tuple[str, int]:
        """Generate after ``prompt``, the *whole* text the session's context should hold (a conversation
        formatted from its start): only the part after the longest common prefix with what the context holds
        is decoded, the rest of the context is dropped, as llama.cpp's server does. Returns the text and the
        number of tokens reused; the stats are then ``load(session_id).last_stats``. The chat history is not
        changed. A turn, like chat() (``timeout`` likewise).
        """
    def checkpoint(self, session_id: str, label: str) -> None:
        """Store the session's state and history as checkpoint ``label`` (during a streamed turn: the state so
        far, without the turn in the history).
        """
    def revert(self, session_id: str, label: str, *, timeout: float | None = None) -> None:
        """Put the session back to checkpoint ``label``: state and history (SessionNotFoundError if none). A
        turn, like chat() (``timeout`` likewise).
        """
    def checkpoints(self, session_id: str) -> builtins.list[str]:
        """Labels of the session's checkpoints, sorted."""
    def trim_history(self, session_id: str, keep_last: int, *, timeout: float | None = None) -> int:
        """Keep the last ``keep_last`` turns of the session's history (a turn: a user message and its answer)
        and drop the older ones; the system prompt stays. Returns how many turns were dropped (0: nothing
        changed). The next chat turn decodes again from the first token that differs (the system prompt's
        tokens are reused). Saved when the manager autosaves. InvalidParameterError for a negative
        ``keep_last``. A turn, like chat() (``timeout`` likewise).
        """
    def live_sessions(self) -> builtins.list[str]:
        """Ids of the sessions loaded in memory, least recently used first."""
    def live_kv_bytes(self) -> int:
        """Bytes of KV cache allocated by the live sessions' contexts (n_ctx cells each, used or not)."""

def list_sessions(session_dir: str | PathLike[str]) -> list[StoredSession]:
    """Every stored session in ``session_dir`` (a directory or a store URL, as SessionManager takes it),
    sorted by id, read without a model (headers only; a load verifies everything). Files that are not
    sessions are ignored; a corrupt one is listed with its error. A directory that does not exist holds no
    session (and is not created).
    """

def inspect_stored_session(session_dir: str | PathLike[str], session_id: str) -> SessionInfo:
    """What stored session ``session_id`` of ``session_dir`` (a directory or a store URL, as SessionManager
    takes it) holds, read without a model from its header alone: parameters, tokens, metadata (the
    manager's record of its system prompt and history under ``"llama_sessions.manager"``) and sizes. Only a
    few KiB are read, so its state is not verified (nor, for a signed session, its MAC): a load verifies
    everything. inspect_session() reads and verifies a whole session file instead. SessionNotFoundError if
    there is no such session; SessionCorruptError for a stored value whose prelude or header is damaged.
    """

def delete_session(session_dir: str | PathLike[str], session_id: str) -> None:
    """Delete stored session ``session_id`` and its checkpoints from ``session_dir`` (a directory or a store
    URL; holding its lock), and their lock files, without a model. SessionNotFoundError if there is none.
    """

def validate_session_id(session_id: str) -> None:
    """Raise InvalidParameterError (a ValueError) unless ``session_id`` can name a session: 1 to 128 bytes, no
    "/", "\\", ":", "@" or control characters, not starting with a dot, neither starting nor ending with
    whitespace.
    """
