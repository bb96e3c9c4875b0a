"""What ``GET /metrics`` reports, in Prometheus' text format (prometheus-client), from a registry of the app's
own: two servers in one process never mix their counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ..manager import SessionManager

if TYPE_CHECKING:  # service imports this module
    from .service import TurnCounts


class Metrics:
    def __init__(self, manager: SessionManager) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llama_sessions_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.prompt_tokens_decoded = Counter(
            "llama_sessions_prompt_tokens_decoded",
            "Prompt tokens the model read (decoded)",
            registry=self.registry,
        )
        self.prompt_tokens_reused = Counter(
            "llama_sessions_prompt_tokens_reused",
            "Prompt tokens not decoded: held by the session's context or restored from stored KV",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "llama_sessions_cache_hits",
            "Turns that reused at least one prompt token instead of decoding it",
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "llama_sessions_generated_tokens", "Tokens generated", registry=self.registry
        )
        self.generation_seconds = Counter(
            "llama_sessions_generation_seconds",
            "Seconds spent generating (generated_tokens / generation_seconds: tokens per second of a turn)",
            registry=self.registry,
        )
        live = Gauge("llama_sessions_live_sessions", "Sessions loaded in memory", registry=self.registry)
        live.set_function(lambda: len(manager.live_sessions()))
        kv = Gauge("llama_sessions_kv_bytes", "Bytes of KV cache allocated", registry=self.registry)
        kv.set_function(manager.live_kv_bytes)
        loads = Gauge(
            "llama_sessions_session_loads",
            "Sessions read from the store and restored since the server started",
            registry=self.registry,
        )
        loads.set_function(lambda: manager.stats["store_loads"])

    def record_turn(self, counts: TurnCounts) -> None:
        self.prompt_tokens_decoded.inc(counts.decoded_tokens)
        self.prompt_tokens_reused.inc(counts.reused_tokens)
        if counts.reused_tokens > 0:
            self.cache_hits.inc()
        self.generated_tokens.inc(counts.generated_tokens)
        self.generation_seconds.inc(counts.generation_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
