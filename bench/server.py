"""OpenAI-compatible servers side by side: `llama-sessions serve` against llama-cpp-python's own server
(`python -m llama_cpp.server`), same model, same threads, same context size, each started as its own
process and driven by OpenAI's Python client over loopback.

Each client has a 3-turn chat (at most 64 greedy tokens per answer, streamed) after a shared system prompt
of about 1,000 tokens; 1, 4 and 8 clients start together. Before the clients, one untimed request reads the
system prompt on each server. Reported: aggregate generated tokens/s (every client's streamed tokens / wall
time), per-client tokens/s, p50/p95 time to first token over every turn. Our clients name their session
(`X-Session-Id`); llama-cpp-python's server answers whatever they send, one request at a time, reusing the
prefix its one context shares with the request (its default configuration, no cache, except
`--interrupt_requests False`: by default a new request cuts the answer being streamed short).

Then the returning user: the server is restarted, and a client of the 8-client run sends its whole
conversation plus a new question. Time to first token, median over 3 clients, a restart before each. Our
server restores the session; llama-cpp-python's reads the conversation again.

The two servers run in turn for each client count (this VM's speed drifts by about 10% over minutes), and
after them the same chats through the SessionManager our server runs on, in this process, without HTTP.

Run: python bench/server.py [--clients 1,4,8] [--returning 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai

from _common import THREADS, VENV_PYTHON, environment, work_dir, write_result
from llama_sessions import Model, SessionManager, default_model_path

SYSTEM_TOKENS = 1000
MAX_TOKENS = 64
N_CTX = 2048
TURNS = [
    "Tell me about {topic}, in detail.",
    "What else should I know about {topic}?",
    "Summarise what you said about {topic}.",
]
RETURNING = "One more question: why does {topic} matter?"
TOPICS = ["lighthouses", "bread", "city markets", "steam engines", "the moon", "rivers", "bees", "libraries"]
COMMAND = "python bench/server.py"
TARGET_CLIENTS = 8
SYSTEMS = {"ours": "llama-sessions serve", "theirs": "llama-cpp-python server"}
#: Our server's work without HTTP: the same chats through a SessionManager in this process.
IN_PROCESS = "manager"


def system_prompt(model: Model) -> str:
    """A system prompt of about SYSTEM_TOKENS tokens."""
    text = "You are a careful assistant of a city library. Follow these house rules.\n"
    i = 0
    while len(model.tokenize(text)) < SYSTEM_TOKENS:
        text += f"Rule {i}: answer clearly, cite shelf {i * 7 + 3} only when asked, and stay polite.\n"
        i += 1
    return text


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def server(system: str, model_path: Path, sessions: Path, log: Path) -> Iterator[str]:
    """A running server of ``system``; yields its base URL."""
    port = free_port()
    if system == "ours":
        command = [
            sys.executable, "-m", "llama_sessions", "serve", "--model", str(model_path), "--sessions",
            str(sessions), "--port", str(port), "--n-ctx", str(N_CTX), "--max-live", str(TARGET_CLIENTS),
            "--threads", str(THREADS), "--log-level", "warning",
        ]  # fmt: skip
    else:
        command = [
            str(VENV_PYTHON), "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(port),
            "--host", "127.0.0.1", "--n_ctx", str(N_CTX), "--n_threads", str(THREADS), "--n_threads_batch",
            str(THREADS), "--verbose", "False", "--interrupt_requests", "False",
        ]  # fmt: skip
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{system} exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{system} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


_MODEL_IDS: dict[str, str] = {}


def served_model(api: openai.OpenAI) -> str:
    """The model id a server serves (asked once per server)."""
    url = str(api.base_url)
    if url not in _MODEL_IDS:
        _MODEL_IDS[url] = api.models.list().data[0].id
    return _MODEL_IDS[url]


def streamed_turn(api: openai.OpenAI, messages: list[dict[str, str]], session: str | None) -> dict[str, Any]:
    """One streamed answer: its text, its token count (content chunks: one per token on both servers) and
    the time to its first token."""
    model = served_model(api)
    asked = time.perf_counter()
    first = None
    pieces = []
    stream = api.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        extra_headers={"X-Session-Id": session} if session else None,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - asked
            pieces.append(chunk.choices[0].delta.content)
    if not pieces:
        raise RuntimeError(f"an empty answer from {api.base_url} (an interrupted request?)")
    return {"text": "".join(pieces), "tokens": len(pieces), "ttft": first}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_clients(
    system: str, url: str, n: int, prompt: str
) -> tuple[dict[str, Any], list[list[dict[str, str]]]]:
    api = client(url)
    # Untimed: the system prompt is read once before the clients start (a server's steady state).
    warm = [{"role": "system", "content": prompt}, {"role": "user", "content": "Hello."}]
    streamed_turn(api, warm, "warm" if system == "ours" else None)
    conversations: list[list[dict[str, str]]] = [[{"role": "system", "content": prompt}] for _ in range(n)]
    ttft: list[float] = []
    tokens = [0] * n
    finished = [0.0] * n
    lock = threading.Lock()
    start_line = threading.Barrier(n + 1)
    started = 0.0
    errors: list[BaseException] = []

    def chat(i: int) -> None:
        try:
            own = client(url)
            start_line.wait()
            for turn in TURNS:
                conversations[i].append({"role": "user", "content": turn.format(topic=TOPICS[i])})
                reply = streamed_turn(own, conversations[i], f"client-{n}-{i}" if system == "ours" else None)
                conversations[i].append({"role": "assistant", "content": reply["text"]})
                with lock:
                    tokens[i] += reply["tokens"]
                    if reply["ttft"] is not None:
                        ttft.append(reply["ttft"])
            finished[i] = time.perf_counter() - started
        except BaseException as error:  # reported after the join
            errors.append(error)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    start_line.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    row = {
        "clients": n,
        "generated_tokens": sum(tokens),
        "wall_seconds": wall,
        "aggregate_tokens_per_second": sum(tokens) / wall,
        "per_client_tokens_per_second": statistics.median(t / f for t, f in zip(tokens, finished)),
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p95": percentile(ttft, 0.95),
    }
    return row, conversations


def run_in_process(model: Model, n: int, prompt: str, sessions: Path) -> dict[str, Any]:
    """The clients' chats through the SessionManager the server runs on (same options), in this process:
    what the server adds (HTTP, streaming through worker threads) is the difference."""
    manager = SessionManager(
        model,
        sessions,
        n_ctx=N_CTX,
        max_live=TARGET_CLIENTS,
        n_threads=THREADS,
        batching=True,
        overflow="error",
    )
    warm = [{"role": "system", "content": prompt}, {"role": "user", "content": "Hello."}]
    manager.create_session("warm", prompt)
    manager.chat_messages("warm", warm, MAX_TOKENS, temperature=0.0)
    ttft: list[float] = []
    tokens = [0] * n
    finished = [0.0] * n
    lock = threading.Lock()
    start_line = threading.Barrier(n + 1)
    started = 0.0

    def chat(i: int) -> None:
        session = f"client-{n}-{i}"
        conversation = [{"role": "system", "content": prompt}]
        manager.create_session(session, prompt)
        start_line.wait()
        for turn in TURNS:
            conversation.append({"role": "user", "content": turn.format(topic=TOPICS[i])})
            asked = time.perf_counter()
            first = None
            stream = manager.stream_chat_messages(session, conversation, MAX_TOKENS, temperature=0.0)
            pieces = []
            for piece in stream:
                if first is None:
                    first = time.perf_counter() - asked
                pieces.append(piece)
            conversation.append({"role": "assistant", "content": "".join(pieces)})
            stats = stream.stats
            assert stats is not None and first is not None
            with lock:
                tokens[i] += stats.generated_tokens
                ttft.append(first)
        finished[i] = time.perf_counter() - started

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    started = time.perf_counter()
    start_line.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {
        "clients": n,
        "generated_tokens": sum(tokens),
        "wall_seconds": wall,
        "aggregate_tokens_per_second": sum(tokens) / wall,
        "per_client_tokens_per_second": statistics.median(t / f for t, f in zip(tokens, finished)),
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p95": percentile(ttft, 0.95),
    }


def returning_user(
    system: str, model_path: Path, sessions: Path, log: Path, conversation: list[dict[str, str]], index: int
) -> float:
    """Time to the first token of a returning user's next question, on a freshly started server."""
    topic = TOPICS[index]
    with server(system, model_path, sessions, log) as url:
        api = client(url)
        served_model(api)  # the server is up and answering before the clock starts
        messages = [*conversation, {"role": "user", "content": RETURNING.format(topic=topic)}]
        reply = streamed_turn(api, messages, f"client-{TARGET_CLIENTS}-{index}" if system == "ours" else None)
    assert reply["ttft"] is not None, f"{system}: no token for the returning user"
    return float(reply["ttft"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--returning", type=int, default=3, help="returning users measured (a restart each)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    env = environment()
    model_path = default_model_path()
    model = Model.load(model_path)
    prompt = system_prompt(model)
    root = work_dir() / "server"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log = root / "servers.log"
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in [*SYSTEMS, IN_PROCESS]}
    last_conversations: dict[str, list[list[dict[str, str]]]] = {}
    for n in counts:
        for name in SYSTEMS:
            sessions = root / f"sessions-{n}"
            with server(name, model_path, sessions, log) as url:
                row, conversations = run_clients(name, url, n, prompt)
            rows[name].append(row)
            last_conversations[name] = conversations
            print(name, json.dumps(row), flush=True)
        rows[IN_PROCESS].append(run_in_process(model, n, prompt, root / f"in-process-{n}"))
        print(IN_PROCESS, json.dumps(rows[IN_PROCESS][-1]), flush=True)
    returning: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    if TARGET_CLIENTS in counts:
        for index in range(min(args.returning, TARGET_CLIENTS)):
            for name in SYSTEMS:
                seconds = returning_user(
                    name,
                    model_path,
                    root / f"sessions-{TARGET_CLIENTS}",
                    log,
                    last_conversations[name][index],
                    index,
                )
                returning[name].append(seconds)
                print(name, "returning user", f"{seconds:.3f} s", flush=True)
    write_result(
        "server",
        {
            "environment": env,
            "command": COMMAND,
            "config": {
                "system_tokens": SYSTEM_TOKENS,
                "turns": len(TURNS),
                "max_tokens": MAX_TOKENS,
                "n_ctx": N_CTX,
                "threads": THREADS,
                "target_clients": TARGET_CLIENTS,
                "returning_users": len(returning["ours"]),
                "history_tokens_returning": conversation_tokens(
                    model_path, last_conversations.get("ours", [[]])[0]
                ),
            },
            "rows": rows,
            "returning_ttft": returning,
            "targets": targets(rows, returning),
        },
    )


def conversation_tokens(model_path: Path, conversation: list[dict[str, str]]) -> int:
    if not conversation:
        return 0
    model = Model.load(model_path)
    return len(
        model.tokenize(model.apply_chat_template(conversation, add_generation_prompt=False), special=True)
    )


def targets(rows: dict[str, list[dict[str, Any]]], returning: dict[str, list[float]]) -> list[dict[str, Any]]:
    at = {
        name: next((r for r in table if r["clients"] == TARGET_CLIENTS), None) for name, table in rows.items()
    }
    out = []
    ours, theirs = at["ours"], at["theirs"]
    if ours and theirs:
        ratio = ours["aggregate_tokens_per_second"] / theirs["aggregate_tokens_per_second"]
        out.append(
            {
                "name": f"server, {TARGET_CLIENTS} concurrent clients: aggregate tokens/s, ours / "
                "llama-cpp-python's server",
                "measured": f"{ratio:.2f}x ({ours['aggregate_tokens_per_second']:.1f} vs "
                f"{theirs['aggregate_tokens_per_second']:.1f} tok/s)",
                "target": ">= 1.6x",
                "pass": ratio >= 1.6,
                "command": COMMAND,
            }
        )
    if returning["ours"] and returning["theirs"]:
        ours_s, theirs_s = statistics.median(returning["ours"]), statistics.median(returning["theirs"])
        out.append(
            {
                "name": "server, returning user after a restart: time to first token, "
                "llama-cpp-python's server / ours",
                "measured": f"{theirs_s / ours_s:.0f}x ({ours_s * 1000:.0f} vs {theirs_s * 1000:.0f} ms)",
                "target": ">= 20x",
                "pass": theirs_s / ours_s >= 20,
                "command": COMMAND,
            }
        )
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
