"""llama-sessions: resumable local LLM inference with llama.cpp.

A :class:`Context` keeps the KV cache *and* the bookkeeping of what is in it: no call takes a position, every
call continues where the context stands.

>>> from llama_sessions import Model, Context, default_model_path
>>> model = Model.load(default_model_path())
>>> ctx = Context(model, n_ctx=2048)
>>> ctx.generate("You are a terse assistant.\\n", max_tokens=0)  # encode only
''
>>> answer = ctx.generate("Q: What is the capital of France?\\nA:", max_tokens=16, temperature=0)
"""

from __future__ import annotations

from ._fetch import cache_dir, default_model_path
from ._native import (
    ChatStream,
    Context,
    ContextParams,
    GenerationStats,
    Model,
    PrefixCache,
    SessionInfo,
    StoredSession,
    TokenStream,
    __version__,
    delete_session,
    inspect_session,
    inspect_stored_session,
    list_sessions,
    validate_session_id,
)
from .errors import (
    ChatTemplateError,
    ContextCreateError,
    ContextFullError,
    DecodeError,
    InternalError,
    InvalidParameterError,
    KvBudgetFullError,
    LlamaSessionsError,
    ModelFetchError,
    ModelLoadError,
    RemoteStoreError,
    SessionBusyError,
    SessionConflictError,
    SessionCorruptError,
    SessionError,
    SessionExistsError,
    SessionInteropWarning,
    SessionModelMismatchError,
    SessionNotFoundError,
    SessionParamsMismatchError,
    SessionSignatureError,
    SessionVersionError,
    StorageError,
    StreamInvalidatedError,
    TokenizeError,
    UnsavedSessionsWarning,
)
from .manager import SessionManager

__all__ = [
    "ChatStream",
    "ChatTemplateError",
    "Context",
    "ContextCreateError",
    "ContextFullError",
    "ContextParams",
    "DecodeError",
    "GenerationStats",
    "InternalError",
    "InvalidParameterError",
    "KvBudgetFullError",
    "LlamaSessionsError",
    "Model",
    "ModelFetchError",
    "ModelLoadError",
    "PrefixCache",
    "RemoteStoreError",
    "SessionBusyError",
    "SessionConflictError",
    "SessionCorruptError",
    "SessionError",
    "SessionExistsError",
    "SessionInfo",
    "SessionInteropWarning",
    "SessionManager",
    "SessionModelMismatchError",
    "SessionNotFoundError",
    "SessionParamsMismatchError",
    "SessionSignatureError",
    "SessionVersionError",
    "StorageError",
    "StoredSession",
    "StreamInvalidatedError",
    "TokenStream",
    "TokenizeError",
    "UnsavedSessionsWarning",
    "__version__",
    "cache_dir",
    "default_model_path",
    "delete_session",
    "inspect_session",
    "inspect_stored_session",
    "list_sessions",
    "validate_session_id",
]
