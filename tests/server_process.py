"""A real ``llama-sessions serve`` process on loopback, for the server tests."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    def __init__(
        self, sessions: pathlib.Path, model_path: pathlib.Path, extra: Sequence[str], log: pathlib.Path
    ):
        self.port = free_port()
        self.log = log
        command = [
            sys.executable,
            "-m",
            "llama_sessions",
            "serve",
            "--model",
            str(model_path),
            "--sessions",
            str(sessions),
            "--port",
            str(self.port),
            "--n-ctx",
            "1024",
            "--max-live",
            "4",
            "--log-level",
            "warning",
            *extra,
        ]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
        self._wait_until_ready()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}: {self.log.read_text()}"
                )
            with contextlib.suppress(OSError):
                status, _, _ = self.request("GET", "/health")
                if status == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in 120 s: {self.log.read_text()}")

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request: status, headers, body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, key: str | None = None, document: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        body = None if document is None else json.dumps(document).encode()
        status, _, raw = self.request(method, path, body, headers)
        return status, json.loads(raw)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_server(
    sessions: str | pathlib.Path, model_path: pathlib.Path, *extra: str, log: pathlib.Path | None = None
) -> Iterator[ServerProcess]:
    """A server on ``sessions`` (a directory, or a store URL: then ``log`` is needed)."""
    if log is None:
        assert isinstance(sessions, pathlib.Path), "a server on a store URL needs a log path"
        log = sessions.parent / "server.log"
    server = ServerProcess(sessions, model_path, extra, log)
    try:
        yield server
    finally:
        server.stop()
