"""SessionManager: many named, persistent sessions for many users on one model, with asyncio variants.

The logic lives in the Rust core (``llama_sessions._native.SessionManager``); this subclass adds the ``a*``
coroutines, which run the native calls in worker threads (they release the GIL), so an event loop is never
blocked by inference or I/O, and the UnsavedSessionsWarning of a manager with ``autosave=False`` that goes
with changes never saved (garbage-collected, or at interpreter exit).
"""

from __future__ import annotations

import asyncio
import atexit
import builtins
import warnings
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any

from ._native import SAMPLING_DEFAULTS as _DEFAULTS
from ._native import ChatStream, Context, ContextParams, Model, PrefixCache, StoredSession
from ._native import SessionManager as _NativeSessionManager
from .errors import UnsavedSessionsWarning

if TYPE_CHECKING:  # aliases that exist only in the stub
    from ._native import KvType, OverflowPolicy, SessionInfo, SessionStorage

__all__ = ["SessionManager"]

#: Managers with autosave off, checked for unsaved sessions when the interpreter exits. Weak: a manager that
#: is garbage-collected earlier warns from ``__del__`` instead.
_WITHOUT_AUTOSAVE: weakref.WeakSet[SessionManager] = weakref.WeakSet()


@atexit.register
def _warn_about_unsaved_sessions_at_exit() -> None:
    for manager in list(_WITHOUT_AUTOSAVE):
        manager._warn_if_unsaved("the interpreter exits")


class SessionManager(_NativeSessionManager):
    """Many named, persistent sessions on one model (see docs/manager.md).

    Each session is a file ``<session_id>.session`` in ``session_dir`` holding the chat history, a version
    number and the context's state: by default (``storage="chunks"``) as a manifest naming the KV chunks it
    shares with other sessions in ``session_dir/chunks``, so that a shared system prompt or document is stored
    and computed once (export() writes one self-contained file). Up to ``max_live`` sessions stay loaded
    (least recently used first out, saved before they go); a system prompt is encoded once per manager
    however many sessions start from it.
    Saves are atomic and version-checked: a save over a version it did not load raises SessionConflictError
    instead of silently dropping someone else's turn. A turn (``chat``, a ``stream_chat`` stream until it
    ends, ``generate_reusing_prefix``, ``revert``) holds its session: another turn waits for it (``timeout``
    bounds the wait, then SessionBusyError) and eviction passes it by. Safe to share between threads and
    between processes using one directory.

    Durable by default (``autosave=True``). With ``autosave=False``, a manager that goes (garbage-collected,
    or at interpreter exit) while sessions have unsaved changes warns with UnsavedSessionsWarning naming them.
    """

    def __init__(
        self,
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
    ) -> None:
        # The native __new__ built the manager from these arguments; here it only joins the watch for
        # unsaved sessions when it does not save them itself.
        self._unsaved_warning_due = not self.autosave
        if self._unsaved_warning_due:
            _WITHOUT_AUTOSAVE.add(self)

    def _warn_if_unsaved(self, why: str) -> None:
        """Warns once, as the manager goes (``why``), if some of its sessions have unsaved changes."""
        if not getattr(self, "_unsaved_warning_due", False):
            return
        self._unsaved_warning_due = False
        unsaved = self.unsaved_sessions()
        if unsaved:
            warnings.warn(
                f"SessionManager({self.location!r}, autosave=False) goes as {why} with unsaved "
                f"changes in sessions {unsaved}: they are lost. Call save(session_id) before, or keep the "
                "default autosave=True.",
                UnsavedSessionsWarning,
                stacklevel=3,
            )

    def __del__(self) -> None:
        self._warn_if_unsaved("it is garbage-collected")

    async def acreate_session(
        self,
        session_id: str,
        system_prompt: str | None = None,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Context:
        """create_session() without blocking the event loop."""
        return await asyncio.to_thread(self.create_session, session_id, system_prompt, metadata=metadata)

    async def aload(self, session_id: str) -> Context:
        """load() without blocking the event loop."""
        return await asyncio.to_thread(self.load, session_id)

    async def aload_or_create(self, session_id: str, system_prompt: str | None = None) -> Context:
        """load_or_create() without blocking the event loop."""
        return await asyncio.to_thread(self.load_or_create, session_id, system_prompt)

    async def asave(self, session_id: str, context: Context | None = None) -> None:
        """save() without blocking the event loop."""
        await asyncio.to_thread(self.save, session_id, context)

    async def aexport(self, session_id: str, path: str | PathLike[str]) -> SessionInfo:
        """export() without blocking the event loop."""
        return await asyncio.to_thread(self.export, session_id, path)

    async def adelete(self, session_id: str) -> None:
        """delete() without blocking the event loop."""
        await asyncio.to_thread(self.delete, session_id)

    async def alist(self) -> builtins.list[StoredSession]:
        """list() without blocking the event loop."""
        return await asyncio.to_thread(self.list)

    async def acheckpoint(self, session_id: str, label: str) -> None:
        """checkpoint() without blocking the event loop."""
        await asyncio.to_thread(self.checkpoint, session_id, label)

    async def arevert(self, session_id: str, label: str, *, timeout: float | None = None) -> None:
        """revert() without blocking the event loop."""
        await asyncio.to_thread(self.revert, session_id, label, timeout=timeout)

    async def atrim_history(self, session_id: str, keep_last: int, *, timeout: float | None = None) -> int:
        """trim_history() without blocking the event loop."""
        return await asyncio.to_thread(self.trim_history, session_id, keep_last, timeout=timeout)

    async def achat(
        self,
        session_id: str,
        user_message: str,
        max_tokens: int = _DEFAULTS["max_tokens"],
        *,
        temperature: float = _DEFAULTS["temperature"],
        top_k: int = _DEFAULTS["top_k"],
        top_p: float = _DEFAULTS["top_p"],
        min_p: float = _DEFAULTS["min_p"],
        repeat_penalty: float = _DEFAULTS["repeat_penalty"],
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """chat() without blocking the event loop."""
        return await asyncio.to_thread(
            self.chat,
            session_id,
            user_message,
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            timeout=timeout,
        )

    async def astream_chat(
        self,
        session_id: str,
        user_message: str,
        max_tokens: int = _DEFAULTS["max_tokens"],
        *,
        temperature: float = _DEFAULTS["temperature"],
        top_k: int = _DEFAULTS["top_k"],
        top_p: float = _DEFAULTS["top_p"],
        min_p: float = _DEFAULTS["min_p"],
        repeat_penalty: float = _DEFAULTS["repeat_penalty"],
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[str]:
        """stream_chat() as an async iterator: each piece is generated in a worker thread. Leaving the loop
        early closes the stream, which frees the session for its next turn."""
        stream = await asyncio.to_thread(
            self.stream_chat,
            session_id,
            user_message,
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            timeout=timeout,
        )
        async for piece in _pieces(stream):
            yield piece

    async def achat_messages(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = _DEFAULTS["max_tokens"],
        *,
        temperature: float = _DEFAULTS["temperature"],
        top_k: int = _DEFAULTS["top_k"],
        top_p: float = _DEFAULTS["top_p"],
        min_p: float = _DEFAULTS["min_p"],
        repeat_penalty: float = _DEFAULTS["repeat_penalty"],
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> str:
        """chat_messages() without blocking the event loop."""
        return await asyncio.to_thread(
            self.chat_messages,
            session_id,
            messages,
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            timeout=timeout,
        )

    async def astream_chat_messages(
        self,
        session_id: str,
        messages: Sequence[Mapping[str, str]],
        max_tokens: int = _DEFAULTS["max_tokens"],
        *,
        temperature: float = _DEFAULTS["temperature"],
        top_k: int = _DEFAULTS["top_k"],
        top_p: float = _DEFAULTS["top_p"],
        min_p: float = _DEFAULTS["min_p"],
        repeat_penalty: float = _DEFAULTS["repeat_penalty"],
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[str]:
        """stream_chat_messages() as an async iterator, as astream_chat() is for stream_chat()."""
        stream = await asyncio.to_thread(
            self.stream_chat_messages,
            session_id,
            messages,
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            stop=stop,
            timeout=timeout,
        )
        async for piece in _pieces(stream):
            yield piece


async def _pieces(stream: ChatStream) -> AsyncIterator[str]:
    """The pieces of ``stream``, each generated in a worker thread; leaving early closes the stream (which
    frees its session for the next turn)."""
    try:
        while True:
            piece = await asyncio.to_thread(next, stream, None)
            if piece is None:
                return
            yield piece
    finally:
        stream.close()
