"""What the server does with a request, on one SessionManager: which stored session a conversation runs on,
and the turn itself, run in worker threads so that the event loop never waits for inference or I/O.

Every conversation runs on a session of the manager, stored under an id that starts with its API key's
namespace:

- ``NS-s-ID``: the session a client names (header ``X-Session-Id`` or body field ``session_id``). It is
  created by its first request and persists: after a restart, or on another worker sharing the directory, its
  next request restores its KV cache instead of reading the conversation again.
- ``NS-chat-N``, ``NS-text-N``: slots for requests that name no session (chat, and plain completions). A
  request takes the free slot whose last conversation shares the longest start with its own, so a client that
  sends its whole history every turn has only the new messages read.

Whatever a conversation shares with any other (a long system prompt) is also restored from the manager's chunk
store rather than read again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from .._native import ChatStream, GenerationStats, validate_session_id
from ..errors import InvalidParameterError, SessionExistsError, SessionNotFoundError
from ..manager import SessionManager
from .errors import ApiError, bad_request
from .metrics import Metrics

T = TypeVar("T")

#: Longest id validate_session_id() accepts, in bytes; a client's id shares it with its namespace prefix.
MAX_SESSION_ID_BYTES = 128


async def in_thread(function: Callable[[], T]) -> T:
    """``function()`` in a worker thread of anyio's pool (40 threads: a turn waiting for its session does not
    hold up the others, as it would in asyncio's default pool of a few threads on a small machine)."""
    return await anyio.to_thread.run_sync(function)


@dataclass
class Sampling:
    """A request's generation options, as SessionManager takes them."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def keywords(self) -> dict[str, Any]:
        options: dict[str, Any] = {"seed": self.seed, "stop": self.stop or None}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.top_p is not None:
            options["top_p"] = self.top_p
        return options


@dataclass
class Slot:
    session_id: str
    busy: bool = False
    #: What it held last, answer included: a chat's messages, or a completion's text (empty: unknown, as
    #: after a restart).
    held: Sequence[Any] = ()
    last_used: float = 0.0


class SlotPool:
    """The slots of one namespace and kind; a request waits when all are busy."""

    def __init__(self, id_prefix: str, size: int) -> None:
        self._slots = [Slot(f"{id_prefix}{index}") for index in range(size)]
        self._changed = asyncio.Condition()

    async def acquire(self, wanted: Sequence[Any]) -> Slot:
        """The free slot that holds the longest start of ``wanted`` (messages, or text); waits while none is
        free."""
        async with self._changed:
            while True:
                free = [slot for slot in self._slots if not slot.busy]
                if free:
                    # The most similar conversation; among equals the least recently used, which keeps the
                    # others' conversations for their clients.
                    slot = max(free, key=lambda s: (_shared_start(s.held, wanted), -s.last_used))
                    slot.busy = True
                    return slot
                await self._changed.wait()

    async def release(self, slot: Slot, held: Sequence[Any] | None) -> None:
        """Frees ``slot``, which now holds ``held`` (None: unknown, as after a failed turn), even in a task
        being cancelled (a client that went away), so that no slot stays taken for ever."""
        with anyio.CancelScope(shield=True):
            async with self._changed:
                slot.busy = False
                slot.last_used = time.monotonic()
                slot.held = held if held is not None else ()
                self._changed.notify()


def _shared_start(a: Sequence[Any], b: Sequence[Any]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


@dataclass(frozen=True)
class TurnCounts:
    """What a request cost: the prompt's tokens (the whole formatted conversation), how many of them the model
    read for it (the turn's, plus a new session's system prompt), the answer's tokens and why it ended."""

    prompt_tokens: int
    decoded_tokens: int
    generated_tokens: int
    generation_seconds: float
    stop_reason: str

    @staticmethod
    def of(stats: GenerationStats, decoded_before: int = 0) -> TurnCounts:
        return TurnCounts(
            prompt_tokens=stats.context_tokens,
            decoded_tokens=min(stats.context_tokens, stats.prompt_tokens + decoded_before),
            generated_tokens=stats.generated_tokens,
            generation_seconds=stats.generation_seconds,
            stop_reason=stats.stop_reason,
        )

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens the model did not read for this request: held by the context, or restored."""
        return self.prompt_tokens - self.decoded_tokens


@dataclass(frozen=True)
class OpenedChat:
    """A chat turn's stream, and the tokens that creating its session decoded (its system prompt)."""

    stream: ChatStream
    decoded_by_creation: int


class ChatTurn:
    """A chat turn in progress: its pieces, then its counts. ``end()`` (always called, also when the client
    goes away) ends it: a turn ended before its last piece changes nothing in the session's history. It then
    frees the slot the turn ran on."""

    def __init__(
        self,
        opened: OpenedChat,
        metrics: Metrics,
        on_end: Callable[[str | None], Awaitable[None]] | None,
    ) -> None:
        self._stream = opened.stream
        self._decoded_by_creation = opened.decoded_by_creation
        self._metrics = metrics
        self._on_end = on_end
        self._finished = False
        self.text = ""

    async def pieces(self) -> AsyncIterator[str]:
        while True:
            piece = await in_thread(lambda: next(self._stream, None))
            if piece is None:
                self._finished = True
                return
            self.text += piece
            yield piece

    async def complete(self) -> str:
        async for _ in self.pieces():
            pass
        return self.text

    @property
    def counts(self) -> TurnCounts | None:
        """The turn's counts once its answer is complete (None before, and for a turn ended early)."""
        stats = self._stream.stats
        return None if stats is None else TurnCounts.of(stats, self._decoded_by_creation)

    async def end(self) -> None:
        """Ends the turn (once; later calls do nothing), even in a task being cancelled."""
        with anyio.CancelScope(shield=True):
            self._stream.close()
            counts = self.counts
            if self._finished and counts is not None:
                self._metrics.record_turn(counts)
                self._finished = False
            if self._on_end is not None:
                on_end, self._on_end = self._on_end, None
                await on_end(self.text if counts is not None else None)


class Service:
    def __init__(
        self,
        manager: SessionManager,
        metrics: Metrics,
        *,
        turn_timeout: float,
        default_max_tokens: int,
        slots_per_namespace: int,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.turn_timeout = turn_timeout
        self.default_max_tokens = default_max_tokens
        self._slots_per_namespace = slots_per_namespace
        self._pools: dict[str, SlotPool] = {}

    # Naming --------------------------------------------------------------------------------------------

    @staticmethod
    def named_prefix(namespace: str) -> str:
        return f"{namespace}-s-"

    def stored_id(self, namespace: str, session_id: str) -> str:
        """The stored id of the session a client names; 400 for an id that cannot name one."""
        prefix = self.named_prefix(namespace)
        longest = MAX_SESSION_ID_BYTES - len(prefix.encode())
        if len(session_id.encode()) > longest:
            raise bad_request(
                f"invalid session id: expected at most {longest} bytes, found {len(session_id.encode())}",
                param="session_id",
            )
        try:
            validate_session_id(session_id)
        except InvalidParameterError as error:
            # The library's rule, with the length left to a client's id.
            message = str(error).replace("session_id", "session id", 1)
            message = message.replace(f"1 to {MAX_SESSION_ID_BYTES} bytes", f"1 to {longest} bytes", 1)
            raise bad_request(message, param="session_id") from None
        return prefix + session_id

    def _pool(self, namespace: str, kind: str) -> SlotPool:
        key = f"{namespace}-{kind}-"
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = SlotPool(key, self._slots_per_namespace)
        return pool

    # Turns ---------------------------------------------------------------------------------------------

    async def start_chat(
        self, namespace: str, session_id: str | None, conversation: list[dict[str, str]], sampling: Sampling
    ) -> ChatTurn:
        """Starts the answer to ``conversation`` (checked, planned and its prompt read before this returns,
        so that a refusal is an error response, not a broken stream)."""
        if session_id is not None:
            stored = self.stored_id(namespace, session_id)
            opened = await in_thread(lambda: self._open_chat(stored, conversation, sampling))
            return ChatTurn(opened, self.metrics, None)
        pool = self._pool(namespace, "chat")
        slot = await pool.acquire(conversation)
        try:
            opened = await in_thread(lambda: self._open_chat(slot.session_id, conversation, sampling))
        except BaseException:
            await pool.release(slot, None)
            raise

        async def release(answer: str | None) -> None:
            held = None if answer is None else [*conversation, {"role": "assistant", "content": answer}]
            await pool.release(slot, held)

        return ChatTurn(opened, self.metrics, release)

    def _open_chat(
        self, stored_id: str, conversation: list[dict[str, str]], sampling: Sampling
    ) -> OpenedChat:
        def stream() -> ChatStream:
            return self.manager.stream_chat_messages(
                stored_id, conversation, sampling.max_tokens, timeout=self.turn_timeout, **sampling.keywords()
            )

        try:
            return OpenedChat(stream(), 0)
        except SessionNotFoundError:
            system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
            decoded = self._create(stored_id, system)
            return OpenedChat(stream(), decoded)

    def _create(self, stored_id: str, system_prompt: str | None) -> int:
        """Creates session ``stored_id`` from ``system_prompt`` unless another request just did; returns the
        tokens that decoded. A system prompt the manager encoded before is restored whole, where the chunk
        store would restore only its full chunks and leave the rest to read."""
        try:
            created = self.manager.create_session(stored_id, system_prompt)
        except SessionExistsError:
            return 0
        stats = created.last_stats
        return 0 if stats is None else stats.prompt_tokens

    async def complete_text(self, namespace: str, prompt: str, sampling: Sampling) -> tuple[str, TurnCounts]:
        """The continuation of ``prompt`` (plain text, the model's markup allowed), on a text slot."""
        pool = self._pool(namespace, "text")
        slot = await pool.acquire(prompt)
        answer: str | None = None
        try:
            text, stats = await in_thread(lambda: self._complete(slot.session_id, prompt, sampling))
            answer = text
        finally:
            await pool.release(slot, None if answer is None else prompt + answer)
        counts = TurnCounts.of(stats)
        self.metrics.record_turn(counts)
        return text, counts

    def _complete(self, stored_id: str, prompt: str, sampling: Sampling) -> tuple[str, GenerationStats]:
        if not self.manager.exists(stored_id):
            self._create(stored_id, None)
        text, _ = self.manager.generate_reusing_prefix(
            stored_id, prompt, sampling.max_tokens, timeout=self.turn_timeout, **sampling.keywords()
        )
        # The slot is this request's alone, so the session's last stats are this turn's.
        stats = self.manager.load(stored_id).last_stats
        if stats is None:
            raise ApiError(500, "the completion left no stats", error_type="server_error")
        return text, stats
