"""Shared fixtures: the real default model, loaded once per test session, and files derived from it."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

import pytest

from llama_sessions import Context, Model, default_model_path

#: Small contexts keep the suite fast on two cores.
SMALL = {"n_ctx": 512, "n_batch": 64}

SYSTEM = "<|im_start|>system\nYou are a storyteller who writes long, vivid stories.<|im_end|>\n"
STORY = (
    "<|im_start|>user\nTell me a long story about a dragon and a lighthouse.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def assert_same_output(actual: Sequence[object], expected: Sequence[object]) -> None:
    """``actual`` equals ``expected``, a generated output (text or tokens) that is not empty: two empty
    outputs are equal whatever the contexts hold, so comparing them would prove nothing."""
    assert len(expected) > 0, "the expected output is empty: comparing it with another proves nothing"
    assert actual == expected


def require_tool(name: str, why: str) -> str:
    """The path of the command-line tool ``name``. Missing, the test is skipped on a developer's machine but
    fails in CI (``CI`` set), where the setup scripts install it: a skip there would hide a test never run."""
    path = shutil.which(name)
    if path is None:
        fail_in_ci_or_skip(f"{name} is not installed ({why}); scripts/common.sh installs it")
    assert path is not None
    return path


def fail_in_ci_or_skip(reason: str) -> None:
    """Skips the test, or fails it in CI (``CI`` set), where everything a test needs is installed."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def model_path() -> pathlib.Path:
    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path: pathlib.Path) -> Model:
    return Model.load(model_path)


@pytest.fixture
def ctx(model: Model) -> Context:
    return Context(model, **SMALL)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def variant_model_path(model_path: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """SmolLM2 rewritten with other weights: same architecture, metadata, tensor names, types and shapes."""
    from make_variant_model import make_variant

    dst = tmp_path_factory.mktemp("variant") / "smollm2-variant.gguf"
    make_variant(model_path, dst)
    return dst


#: The tiny random-weight models of every memory kind (rust/core/tests/common/arch_models.rs), by file stem.
ARCH_MODELS = {
    "tiny-llama": "attention",
    "tiny-gemma3": "sliding_window",
    "tiny-lfm2": "hybrid",
    "tiny-mamba2": "recurrent",
}
#: gemma3's window in the tiny model.
GEMMA3_N_SWA = 16
REPO = pathlib.Path(__file__).resolve().parent.parent


def arch_models_dir() -> pathlib.Path:
    """Where the tiny models are cached: ``$LLAMA_SESSIONS_ARCH_MODELS`` or ``models/arch`` in the cache."""
    from llama_sessions import cache_dir

    override = os.environ.get("LLAMA_SESSIONS_ARCH_MODELS")
    return pathlib.Path(override) if override else cache_dir() / "models" / "arch"


@pytest.fixture(scope="session")
def arch_model_paths(model_path: pathlib.Path) -> dict[str, pathlib.Path]:
    """The tiny models, built on first use by the ``make_arch_models`` example (llama.cpp builds them from
    GGUF metadata, with SmolLM2's tokenizer; seconds) and cached."""
    out = arch_models_dir()
    paths = {name: out / f"{name}.gguf" for name in ARCH_MODELS}
    if not all(p.exists() for p in paths.values()):
        cargo = require_tool("cargo", "it builds the tiny test models")
        env = dict(os.environ)
        env.setdefault(
            "CARGO_TARGET_DIR",
            str(
                pathlib.Path(env.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
                / "llama-sessions"
                / "target"
            ),
        )
        command = [cargo, "run", "--release", "--locked", "-q", "-p", "llama-sessions", "--example"]
        command += ["make_arch_models", "--", str(model_path), str(out)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
    return paths


def run_cli(
    *args: str, model_path: pathlib.Path, lines: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``llama-sessions ARGS`` run as a user runs it, with ``model_path`` as the default model and ``lines``
    (if given) as its standard input."""
    env = dict(os.environ, LLAMA_SESSIONS_MODEL=str(model_path))
    return subprocess.run(
        [sys.executable, "-m", "llama_sessions", *args],
        input=lines,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def running_redis(workdir: pathlib.Path, *tls: str) -> Iterator[int]:
    """A real ``redis-server`` on loopback (installed by scripts/common.sh), with the ``tls`` options given
    (then its port is the TLS port and it has no plain one); yields the port."""
    import socket
    import time

    executable = require_tool("redis-server", "the Redis session store's tests run a real server")
    port = free_port()
    ports = ["--port", "0", "--tls-port", str(port), *tls] if tls else ["--port", str(port)]
    server = subprocess.Popen(
        [executable, *ports, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                    if tls:
                        break
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``redis-server`` on loopback for one test (installed by scripts/common.sh), as a store URL."""
    with running_redis(tmp_path_factory.mktemp("redis")) as port:
        yield f"redis://127.0.0.1:{port}/0"


@pytest.fixture
def rediss_url(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real ``redis-server`` on loopback that speaks only TLS, with a certificate from a test authority
    that ``SSL_CERT_FILE`` names (as a user names their own), as a ``rediss://`` store URL."""
    workdir = tmp_path_factory.mktemp("rediss")
    authority, certificate, key = write_test_certificates(workdir)
    monkeypatch.setenv("SSL_CERT_FILE", str(authority))
    tls = [
        "--tls-cert-file",
        str(certificate),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(authority),
    ]
    with running_redis(workdir, *tls, "--tls-auth-clients", "no") as port:
        yield f"rediss://127.0.0.1:{port}/0"


def write_test_certificates(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A certificate authority, and a server certificate for 127.0.0.1 and localhost that it signed, with
    its key: PEM files (authority, certificate, key) in ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))

    def build(subject: str, issuer: str, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
        )

    authority_key = ec.generate_private_key(ec.SECP256R1())
    authority = (
        build("llama-sessions test authority", "llama-sessions test authority", authority_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(authority_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (
        build("localhost", "llama-sessions test authority", server_key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(authority_key, hashes.SHA256())
    )
    paths = (directory / "authority.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(authority.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


#: Where tests/s3_server.py serves, once per test session: (endpoint, bucket).
S3_BUCKET = "sessions"
S3_CREDENTIALS = "region=us-east-1&access_key_id=test&secret_access_key=test"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server on loopback for the test session (moto's, installed by the test extra; see
    tests/s3_server.py), with the bucket ``S3_BUCKET``; yields its endpoint."""
    try:
        import moto.server  # noqa: F401
    except ImportError as e:
        fail_in_ci_or_skip(f"moto is not installed ({e}); pip install '.[test]' installs it")
    script = pathlib.Path(__file__).with_name("s3_server.py")
    # Port 0: the server binds a free port and names it in its ready line, so nothing takes it in between.
    server = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--bucket", S3_BUCKET],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        ready = server.stdout.readline()
        if not ready.startswith("ready on http://127.0.0.1:"):
            server.kill()
            raise AssertionError(f"the S3 server did not start: {ready!r}\n{server.stderr.read()}")
        port = int(ready.strip().rsplit(":", 1)[1])
        # Drained rather than left in a pipe that would fill and block the server.
        threading.Thread(target=server.stderr.read, daemon=True).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture
def s3_url(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """A store URL in the test S3 bucket, under a prefix of this test's own (endpoint and credentials as
    options in the URL, so that worker processes need no environment)."""
    import uuid

    prefix = f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    return f"s3://{S3_BUCKET}/{prefix}?endpoint={s3_endpoint}&allow_http=true&{S3_CREDENTIALS}"


@pytest.fixture(params=["redis", "s3"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each remote store in turn: a Redis server, then an S3 bucket."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url
