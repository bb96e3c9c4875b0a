"""The exceptions of llama-sessions.

Every failure a caller can cause raises a subclass of :class:`LlamaSessionsError` whose message says what
was expected and what was found. Classes that describe bad arguments also derive from :class:`ValueError`,
so ``except ValueError`` keeps working for code that does not know this library.

A Ctrl-C during a long prefill or generation raises the usual :class:`KeyboardInterrupt`; the tokens decoded
until then stay in the context (its bookkeeping is consistent).
"""

from __future__ import annotations

import errno

__all__ = [
    "ChatTemplateError",
    "ContextCreateError",
    "ContextFullError",
    "DecodeError",
    "InternalError",
    "InvalidParameterError",
    "KvBudgetFullError",
    "LlamaSessionsError",
    "ModelFetchError",
    "ModelLoadError",
    "RemoteStoreError",
    "SessionBusyError",
    "SessionConflictError",
    "SessionCorruptError",
    "SessionError",
    "SessionExistsError",
    "SessionInteropWarning",
    "SessionModelMismatchError",
    "SessionNotFoundError",
    "SessionParamsMismatchError",
    "SessionSignatureError",
    "SessionVersionError",
    "StorageError",
    "StreamInvalidatedError",
    "TokenizeError",
    "UnsavedSessionsWarning",
]


class LlamaSessionsError(Exception):
    """Base class of every error raised by llama-sessions."""


class ModelLoadError(LlamaSessionsError):
    """The model file is missing, is not GGUF, is truncated, or llama.cpp refused it."""


class ModelFetchError(LlamaSessionsError):
    """The default model could not be downloaded, unpacked or verified."""


class InvalidParameterError(LlamaSessionsError, ValueError):
    """A parameter is out of range, or parameters were combined in a way llama.cpp cannot run.

    The message names the parameter, what would be accepted and what was given.
    """


class ContextCreateError(LlamaSessionsError):
    """llama.cpp could not create a context (usually: not enough memory for the KV cache)."""


class ContextFullError(LlamaSessionsError):
    """The prompt does not fit in the space left in the context.

    Raised before anything is decoded: the context is unchanged and stays usable.
    """


class KvBudgetFullError(ContextFullError):
    """A batching SessionManager with ``kv_cells``: the KV cells its live sessions share are held by sessions
    in turns (or whose Context a caller holds), so this call's session has no room until one of those ends.

    Raised before anything is decoded, nothing changed: retry when a turn has ended, or raise ``kv_cells``.
    """


class TokenizeError(LlamaSessionsError, ValueError):
    """Text could not be tokenized, or a token id is outside the model's vocabulary."""


class DecodeError(LlamaSessionsError):
    """llama.cpp failed to decode a batch. Tokens of earlier batches stay in the context."""


class ChatTemplateError(LlamaSessionsError):
    """The model has no chat template, or llama.cpp's template engine does not support it."""


class StreamInvalidatedError(LlamaSessionsError, RuntimeError):
    """A token stream was advanced after another call changed its context."""


class InternalError(LlamaSessionsError, RuntimeError):
    """The KV cache and the bookkeeping disagreed: a bug in llama-sessions. The context was reset."""


class SessionError(LlamaSessionsError):
    """A session could not be loaded, restored, found or saved.

    A failed load or restore loaded nothing: the context is exactly as it was (every check runs before a byte
    of the session reaches llama.cpp). A failed save wrote nothing.
    """


class SessionCorruptError(SessionError):
    """Not a session, truncated, or changed after it was written (the checksum does not match)."""


class SessionModelMismatchError(SessionError):
    """The session was saved with another model: another file, or the same architecture and shapes with other
    weights (the case llama.cpp itself loads silently into garbage). The message names both models."""


class SessionParamsMismatchError(SessionError):
    """The session was saved by a context whose state-relevant parameters differ from this one's.

    The message names each parameter with its saved and current value, as llama.cpp allocated them, and ends
    with ``advice``: what the caller of the API that raised it can do (``Context.load_session``/``restore``:
    create the context with ``Context.from_session``; ``SessionManager.load``: open the manager with the saved
    parameters; the CLI: the option to pass). ``mismatches`` maps each name to ``(saved, current)``, each of
    the parameter's own type (an int for ``n_ctx``, a str for ``type_k``, a bool for ``flash_attn``).
    """

    mismatches: dict[str, tuple[int | str | bool, int | str | bool]]
    advice: str

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.mismatches = {}
        self.advice = ""


class SessionVersionError(SessionError):
    """The session was written in a newer format version, or by a llama.cpp build whose state layout this
    build cannot vouch for."""


class SessionSignatureError(SessionError):
    """A signed session's signature does not hold.

    Raised when a ``secret_key`` was given and the session is unsigned, was modified after it was signed, or
    was signed with another key; and when a signed session is loaded without a key. Nothing was loaded.
    """


class SessionInteropWarning(UserWarning):
    """A llama.cpp session file was loaded: it records neither the model nor the context parameters and has no
    checksum, so only llama.cpp's own checks applied."""


class UnsavedSessionsWarning(UserWarning):
    """A SessionManager with ``autosave=False`` went (garbage-collected, or the interpreter exited) while some
    of its live sessions had changes that were never saved: those changes are lost. The message names the
    sessions. Call ``save()`` before, or keep the default ``autosave=True``."""


class SessionNotFoundError(SessionError, LookupError):
    """A SessionManager has no session (or checkpoint) of that id."""


class SessionExistsError(SessionError):
    """SessionManager.create_session was given the id of an existing session (use load_or_create)."""


class SessionConflictError(SessionError):
    """The stored session changed since this live copy was loaded: another process, or another copy, saved a
    newer version. Nothing was written, and the stale copy left the manager's memory: load the session again
    to continue from the stored version."""


class SessionBusyError(SessionError):
    """A turn in progress holds the session: a ``chat`` in another thread, or a ``stream_chat`` stream that is
    not exhausted, closed or dropped yet (perhaps in this very thread). Raised by the calls that take a
    session's turn (``chat``, ``stream_chat``, ``generate_reusing_prefix``, ``revert``) when their
    ``timeout`` ran out (``timeout=0``: at once), and by ``save(session_id, context)``, which does not wait.
    Nothing was changed."""


class StorageError(LlamaSessionsError, OSError):
    """An operating-system error on a file: missing, not permitted, a directory, a full disk, ...

    Also an :class:`OSError`, with ``errno``, ``strerror`` and ``filename`` set, and an instance of the
    matching built-in subclass where there is one (``except FileNotFoundError`` catches a missing session
    file). A failed save leaves the previous file as it was.
    """


class RemoteStoreError(StorageError, ConnectionError):
    """A remote session store (Redis, S3) could not be reached or refused an operation, or a save held the
    session's lease longer than the lease lasts (another worker may hold it now): nothing was written."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A file or directory that does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """A file or directory that may not be read or written (a read-only directory, say)."""


class StorageIsADirectoryError(StorageError, IsADirectoryError):
    """A directory where a file was expected."""


class StorageNotADirectoryError(StorageError, NotADirectoryError):
    """A path through something that is not a directory."""


class StorageFileExistsError(StorageError, FileExistsError):
    """A file that already exists."""


_STORAGE_ERRORS: dict[int, type[StorageError]] = {
    errno.ENOENT: StorageNotFoundError,
    errno.EACCES: StoragePermissionError,
    errno.EPERM: StoragePermissionError,
    errno.EROFS: StoragePermissionError,
    errno.EISDIR: StorageIsADirectoryError,
    errno.ENOTDIR: StorageNotADirectoryError,
    errno.EEXIST: StorageFileExistsError,
}


def _storage_error(code: int, strerror: str, filename: str) -> StorageError:
    """The exception for an OS error on ``filename`` (called by the native module)."""
    return _STORAGE_ERRORS.get(code, StorageError)(code, strerror, filename)
