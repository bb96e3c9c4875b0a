"""An S3 API server on loopback for the tests (Python's and the Rust core's): moto's, in server mode.

Why moto: it is on PyPI (so the project's setup installs it with the test extra, like every other test
dependency), it runs here without a network or a container, and it implements the conditional writes the
store relies on (``If-None-Match: *`` and ``If-Match: <ETag>`` on PutObject, answering 412). MinIO is
not packaged for Debian or PyPI; the S3 server crates on crates.io implement less of the API.

One change to moto's own ``moto_server``: requests are handled one at a time (a lock around the
application), because moto checks a precondition and then writes without a lock between them, where
Amazon S3 does both atomically. Connections are still served by threads, so a client's keep-alive
connection never blocks another's.

    python tests/s3_server.py --port 9000 --bucket sessions

With ``--port 0`` the system picks a free port: the ``ready on http://HOST:PORT`` line it prints once it
listens names it, so that a test never races another process for a port it chose beforehand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any, Callable

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.test import Client

# moto 5.2.5 added a request handler that keeps the spelling of S3 metadata headers with underscores; the
# store writes none, and any moto the test extra accepts (>= 5.1.5) serves it with werkzeug's own handler.
request_handler: type[WSGIRequestHandler]
try:
    from moto.moto_server.werkzeug_app import MotoRequestHandler as request_handler
except ImportError:
    request_handler = WSGIRequestHandler

#: The path that answers the bytes received and sent so far, for the benchmarks (not an S3 request).
TRAFFIC_PATH = "/_llama_sessions_traffic"


def serialized(
    app: Callable[..., Iterable[bytes]], ignore_conditions: bool = False
) -> Callable[..., Iterable[bytes]]:
    """``app``, answering one request at a time (its whole response computed under one lock), counting the
    bytes of the requests' and responses' bodies; with ``ignore_conditions``, as a store without conditional
    writes does (their headers dropped)."""
    lock = threading.Lock()
    traffic = {"received": 0, "sent": 0, "requests": 0}

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            if environ.get("PATH_INFO") == TRAFFIC_PATH:
                start_response("200 OK", [("Content-Type", "application/json")])
                return [json.dumps(traffic).encode()]
            if ignore_conditions:
                environ.pop("HTTP_IF_MATCH", None)
                environ.pop("HTTP_IF_NONE_MATCH", None)
            body = list(app(environ, start_response))
            traffic["requests"] += 1
            traffic["received"] += int(environ.get("CONTENT_LENGTH") or 0)
            traffic["sent"] += sum(len(chunk) for chunk in body)
            return body

    return handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0: a free port, named by the ready line")
    parser.add_argument("--bucket", action="append", default=[], help="a bucket to create (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    parser.add_argument(
        "--ignore-conditions",
        action="store_true",
        help="ignore If-Match and If-None-Match, as a store without conditional writes does (for a test)",
    )
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    app = serialized(DomainDispatcherApplication(create_backend_app), args.ignore_conditions)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=request_handler)
    port = server.server_port
    os.environ.setdefault("MOTO_PORT", str(port))
    client = Client(app)
    for bucket in args.bucket:
        created = client.put(f"/{bucket}", headers={"Host": f"{args.host}:{port}"})
        if created.status_code != 200:
            raise SystemExit(f"cannot create bucket {bucket!r}: {created.status_code} {created.get_data()!r}")
    print(f"ready on http://{args.host}:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
