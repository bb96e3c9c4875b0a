"""Shared helpers of the benchmarks: environment record, timing, prompts, results, memory readings.

This module must not import llama_sessions at module level: bench/lcp_side.py (run by the llama-cpp-python
virtual environment's interpreter) imports it too.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
#: Where the sessions the benchmarks write go: a real disk (fsync costs what it costs), not a tmpfs.
WORK_DIR = Path(os.environ.get("LLAMA_SESSIONS_BENCH_DIR", Path.home() / ".cache/llama-sessions/bench-work"))
VENV_PYTHON = Path(
    os.environ.get(
        "LLAMA_SESSIONS_BENCH_VENV_PYTHON",
        Path.home() / ".cache/llama-sessions/bench-venv/bin/python",
    )
)

#: How the installed llama_sessions and llama.cpp were built (.cargo/config.toml); recorded, not detected.
BUILD_FLAGS = {
    "rustflags": "-C target-cpu=native",
    "ggml_native": "ON (llama-cpp-sys-2 turns it on for -C target-cpu=native)",
    "cflags": "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "cxxflags": "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
    "llama_cpp_python_cmake_args": "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF (same CFLAGS/CXXFLAGS)",
}
LLAMA_CPP_BUILD = "llama-cpp-sys-2 0.1.161"
RUNS = 5
THREADS = 2

#: Stable, varied English text: the docstrings of standard-library modules (fixed for a Python version).
TEXT_MODULES = (
    "re", "argparse", "subprocess", "json", "csv", "textwrap", "fractions", "heapq", "bisect", "shlex",
    "decimal", "pickle", "tarfile", "difflib", "string", "logging", "inspect", "ftplib", "smtplib",
    "imaplib", "calendar", "random", "statistics", "zipfile", "shutil", "sched", "typing", "doctest",
    "pdb", "trace", "tokenize", "getopt", "optparse", "configparser",
)  # fmt: skip
#: The question asked after the system prompt in the time-to-first-token measurements: a few tokens.
QUESTION = "\nQuestion: why?\nAnswer:"
#: A prompt the model continues for well over 128 tokens without an end-of-generation token (checked).
GENERATION_PROMPT = "The history of the printing press, told in ten short chapters.\n\nChapter 1.\n"
GENERATION_TOKENS = 128


def long_text() -> str:
    """About 12,800 tokens of prose for SmolLM2's tokenizer."""
    parts = []
    for name in TEXT_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        parts.append(doc.strip())
    return "\n\n".join(parts)


def build_prompt(model: Any, n_tokens: int) -> str:
    """A prompt that the model tokenizes to exactly ``n_tokens`` tokens (with BOS if the model adds one):
    the detokenized first tokens of :func:`long_text`, adjusted until the count is exact."""
    tokens = model.tokenize(long_text(), add_bos=False)
    take = n_tokens
    for _ in range(20):
        prompt: str = model.detokenize(tokens[:take])
        got = len(model.tokenize(prompt, add_bos=True))
        if got == n_tokens:
            return prompt
        take += n_tokens - got
    raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")


def shared_prefix_prompts(model: Any, shared: int, total: int, others: int) -> tuple[str, str, list[str]]:
    """Texts of prompts of ``total`` tokens that share their first ``shared`` (BOS included if the model adds
    one), from :func:`long_text`: the shared text, the tail of a prompt A, and ``others`` tails of prompts B,
    each different from A's and from each other's (a prompt offers its own full chunks to a prefix cache,
    which the next must not find). Checked to tokenize back to the shared ids."""
    text = model.tokenize(long_text(), add_bos=False)
    bos = len(model.tokenize(""))  # 1 when the model adds a BOS token
    shared_text: str = model.detokenize(text[: shared - bos])
    tail = total - shared
    tail_a: str = model.detokenize(text[5000 : 5000 + tail])
    starts = [7000 + 400 * i for i in range(others)]
    tails_b: list[str] = [model.detokenize(text[start : start + tail]) for start in starts]
    shared_tokens = model.tokenize(shared_text)
    assert len(shared_tokens) == shared
    for other in (tail_a, *tails_b):
        assert model.tokenize(shared_text + other)[:shared] == shared_tokens, "the prompts must share"
    return shared_text, tail_a, tails_b


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and every run (seconds)."""
    return {
        "median": median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags_of_interest() -> list[str]:
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def llama_cpp_python_version() -> str | None:
    """Version of llama-cpp-python in the benchmark virtual environment, or None if it is not installed."""
    if not VENV_PYTHON.exists():
        return None
    result = subprocess.run(
        [str(VENV_PYTHON), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or None


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_cpu_seconds() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


_START: dict[str, float] = {}


def start_cpu_accounting() -> None:
    busy, total = _cpu_jiffies()
    _START.update(busy=busy, total=total, own=_own_cpu_seconds(), wall=time.monotonic())


def other_cpu_load() -> dict[str, float]:
    """CPU used by other processes since start_cpu_accounting(), in cores (0 = the machine was ours)."""
    busy, _ = _cpu_jiffies()
    hz = os.sysconf("SC_CLK_TCK")
    wall = time.monotonic() - _START["wall"]
    others = (busy - _START["busy"]) / hz - (_own_cpu_seconds() - _START["own"])
    return {"wall_seconds": wall, "other_processes_cores": max(0.0, others / wall)}


def machine_busy_cores(seconds: float = 2.0) -> float:
    """Cores busy on the whole machine over ``seconds`` (ours included)."""
    busy0, _ = _cpu_jiffies()
    time.sleep(seconds)
    busy1, _ = _cpu_jiffies()
    return (busy1 - busy0) / os.sysconf("SC_CLK_TCK") / seconds


def wait_for_quiet(max_wait: float = 900.0, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until the machine is idle (< ``threshold`` cores busy over 2 s): other work
    on a 2-core machine makes llama.cpp's threads wait for each other. Returns the busy cores last seen."""
    start = time.monotonic()
    deadline = start + max_wait
    busy = machine_busy_cores()
    while busy > threshold and time.monotonic() < deadline:
        print(f"machine busy ({busy:.2f} cores in use by others), waiting...", file=sys.stderr, flush=True)
        time.sleep(10)
        busy = machine_busy_cores()
    WAITED[0] += time.monotonic() - start
    return busy


#: Seconds spent in wait_for_quiet by this process.
WAITED = [0.0]


#: Timed runs thrown away because other processes took CPU meanwhile (recorded by write_result).
DISCARDED: list[dict[str, Any]] = []
ACCEPTED_CONTENDED: list[dict[str, Any]] = []


def guarded(fn: Callable[[], T], label: str, tries: int = 6) -> T:
    """Call ``fn`` (a timed run that can be repeated) and return its result, unless other processes used more
    than 0.25 cores (and 50 ms of CPU) meanwhile: then the run is discarded, the machine awaited idle and the
    run repeated, up to ``tries`` times (the last try is kept whatever happened, and recorded)."""
    hz = os.sysconf("SC_CLK_TCK")
    for attempt in range(tries):
        busy0, own0, t0 = _cpu_jiffies()[0], _own_cpu_seconds(), time.perf_counter()
        result = fn()
        busy1, own1, t1 = _cpu_jiffies()[0], _own_cpu_seconds(), time.perf_counter()
        wall = t1 - t0
        other = (busy1 - busy0) / hz - (own1 - own0)
        if other <= max(0.05, 0.25 * wall):
            return result
        record = {"label": label, "wall_seconds": wall, "other_cpu_seconds": other}
        if attempt == tries - 1:
            ACCEPTED_CONTENDED.append(record)
            return result
        DISCARDED.append(record)
        print(
            f"{label}: other processes took {other:.2f} s of CPU in {wall:.2f} s, run repeated",
            file=sys.stderr,
        )
        wait_for_quiet()
    raise AssertionError("unreachable")


def guarded_time(fn: Callable[[], object], label: str) -> float:
    """Seconds of one call of ``fn``, repeated while other processes disturb it (see guarded)."""
    return guarded(lambda: timed(fn), label)


def native_build() -> dict[str, Any]:
    """The installed native module: path, mtime and SHA-256 (which build was measured; the git revision alone
    does not say, a checkout can hold uncommitted changes or differ from what is installed)."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("llama_sessions._native")
    if spec is None or spec.origin is None:
        return {}
    path = Path(spec.origin)
    stat = path.stat()
    return {
        "path": str(path),
        "mtime": datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
    }


def environment() -> dict[str, Any]:
    """What the results depend on: machine, build flags, versions, date. Starts the accounting of the CPU time
    other processes use while the benchmark runs (recorded by write_result)."""
    import llama_sessions

    start_cpu_accounting()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags_of_interest(),
            "cores": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)),
            "memory_bytes": mem_total_bytes(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "build_flags": BUILD_FLAGS,
        "versions": {
            "llama_sessions": llama_sessions.__version__,
            "llama_cpp": LLAMA_CPP_BUILD,
            "llama_cpp_python": llama_cpp_python_version(),
        },
        "git_revision": git_revision(),
        "native_build": native_build(),
        "model": str(llama_sessions.default_model_path()),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write ``bench/results/<name>.json`` (the environment first) and return its path."""
    data["environment"]["machine"]["load_average_at_end"] = list(os.getloadavg())
    before = data["environment"].get("native_build")
    if before is not None and native_build() != before:
        data["environment"]["native_build_changed_during_run"] = native_build()
        print("WARNING: the installed llama_sessions changed during this run", file=sys.stderr)
    if _START:
        data["environment"]["machine"]["other_processes_during_run"] = other_cpu_load()
    data["environment"]["machine"]["seconds_waiting_for_idle"] = WAITED[0]
    data["environment"]["machine"]["discarded_runs"] = DISCARDED
    data["environment"]["machine"]["contended_runs_kept"] = ACCEPTED_CONTENDED
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return path


def work_dir() -> Path:
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return WORK_DIR


# Memory: the RSS high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so
# the peak of one operation is measured exactly, whatever the process did before it.


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def measure_peak(fn: Callable[[], object]) -> dict[str, int]:
    """Run ``fn`` once; return the RSS before it and the peak RSS during it (bytes), and the difference."""
    import gc
    import resource

    gc.collect()
    reset_peak_rss()
    baseline = rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn()
    peak = peak_rss_bytes()
    return {
        "baseline_rss": baseline,
        "peak_rss": peak,
        "peak_above_baseline": peak - baseline,
        "rss_after": rss_bytes(),
        "ru_maxrss_before": maxrss_before,
        "ru_maxrss_after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_json(cmd: Sequence[str], timeout: float = 900) -> Any:
    """Run a command that prints one JSON document on stdout (its stderr passes through) and parse it."""
    result = subprocess.run(list(cmd), stdout=subprocess.PIPE, text=True, check=True, timeout=timeout)
    return json.loads(result.stdout)
