"""Build derived GGUF files for tests from a real model.

* :func:`make_variant` -- same architecture, metadata, tensor names, types and
  shapes (the header is byte-for-byte identical), but different weights: one
  quantised value is nudged every ``stride`` bytes throughout *every* tensor,
  plus the first and last block of each tensor.  Any fingerprint that samples
  tensor data (start, middle or end of the file) sees a difference, while the
  model stays loadable and well-behaved (no NaN/Inf: only quant nibbles/int8
  values and float mantissa LSBs are touched, never block scales).
* :func:`make_truncated` -- the first ``keep_bytes`` bytes of a model.
* :func:`make_not_gguf` -- a file that is not GGUF at all.
* :func:`check_variant` -- re-read both files with ``gguf.GGUFReader`` and assert
  they differ only in tensor data.

The output is deterministic.  Command line::

    python tests/make_variant_model.py variant SRC DST [--stride N] [--no-check]
    python tests/make_variant_model.py truncated SRC DST KEEP_BYTES
    python tests/make_variant_model.py not-gguf DST [--size N]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterable, Sequence

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_STRIDE",
    "check_variant",
    "make_not_gguf",
    "make_truncated",
    "make_variant",
    "perturbation_offsets",
]

#: Distance in bytes between perturbed bytes inside a tensor.
DEFAULT_STRIDE = 4096

_Q = gguf.GGMLQuantizationType

#: type -> (block bytes, first safe byte, end of safe bytes, XOR mask).
#: "Safe" bytes hold quantised values (or float mantissa low bits), never the
#: per-block scales, so a perturbed model never produces NaN/Inf.
_SAFE: dict[gguf.GGMLQuantizationType, tuple[int, int, int, int]] = {
    _Q.F32: (4, 0, 1, 0x01),  # mantissa LSB byte (little endian)
    _Q.F16: (2, 0, 1, 0x01),
    _Q.BF16: (2, 0, 1, 0x01),
    _Q.Q4_0: (18, 2, 18, 0x11),  # d | qs[16]
    _Q.Q4_1: (20, 4, 20, 0x11),  # d m | qs[16]
    _Q.Q5_0: (22, 6, 22, 0x11),  # d qh[4] | qs[16]
    _Q.Q5_1: (24, 8, 24, 0x11),  # d m qh[4] | qs[16]
    _Q.Q8_0: (34, 2, 34, 0x01),  # d | qs[32] (int8)
    _Q.Q2_K: (84, 16, 80, 0x11),  # scales[16] | qs[64] | d dmin
    _Q.Q3_K: (110, 32, 96, 0x11),  # hmask[32] | qs[64] | scales[12] d
    _Q.Q4_K: (144, 16, 144, 0x11),  # d dmin scales[12] | qs[128]
    _Q.Q5_K: (176, 48, 176, 0x11),  # d dmin scales[12] qh[32] | qs[128]
    _Q.Q6_K: (210, 0, 128, 0x11),  # | ql[128] | qh[64] scales[16] d
}


def _tensor_offsets(tensor: gguf.ReaderTensor, stride: int) -> tuple[npt.NDArray[np.int64], int]:
    """Absolute file offsets to perturb inside ``tensor``, and the XOR mask."""
    spec = _SAFE.get(tensor.tensor_type)
    n_bytes = int(tensor.n_bytes)
    if spec is None or n_bytes == 0:
        return np.empty(0, dtype=np.int64), 0
    block, lo, hi, mask = spec
    n_blocks = n_bytes // block
    if n_blocks == 0:
        return np.empty(0, dtype=np.int64), 0
    # Gap between perturbed bytes is at most step * block + block <= stride.
    step = max(1, (stride - block) // block)
    blocks = np.unique(np.append(np.arange(0, n_blocks, step), n_blocks - 1))
    # Vary the byte inside the block so that different quants are touched.
    within = lo + (blocks % (hi - lo))
    offsets = int(tensor.data_offset) + blocks * block + within
    return offsets.astype(np.int64), mask


def perturbation_offsets(
    reader: gguf.GGUFReader,
    *,
    stride: int = DEFAULT_STRIDE,
    names: Iterable[str] | None = None,
) -> list[tuple[str, npt.NDArray[np.int64], int]]:
    """List ``(tensor name, absolute byte offsets, xor mask)`` to perturb.

    Tensors of types without a known safe layout are skipped.
    """
    if stride < 1:
        raise ValueError("stride must be >= 1")
    wanted = None if names is None else set(names)
    plan = []
    for tensor in reader.tensors:
        if wanted is not None and tensor.name not in wanted:
            continue
        offsets, mask = _tensor_offsets(tensor, stride)
        if offsets.size:
            plan.append((tensor.name, offsets, mask))
    if wanted is not None:
        missing = wanted - {t.name for t in reader.tensors}
        if missing:
            raise ValueError(f"no such tensors: {sorted(missing)}")
    return plan


def make_variant(
    src: pathlib.Path,
    dst: pathlib.Path,
    *,
    stride: int = DEFAULT_STRIDE,
    names: Iterable[str] | None = None,
    check: bool = True,
) -> int:
    """Write to ``dst`` a copy of GGUF ``src`` with perturbed weights.

    The header (architecture, metadata, tensor infos) and file size are
    unchanged; one quantised value every ``stride`` bytes, plus the first and
    last block, of each tensor (or only of the tensors in ``names``) is nudged.
    With ``check`` the result is re-read and validated (see
    :func:`check_variant`).  Returns the number of bytes changed.
    """
    src = pathlib.Path(src)
    dst = pathlib.Path(dst)
    reader = gguf.GGUFReader(src)
    plan = perturbation_offsets(reader, stride=stride, names=names)
    if not plan:
        raise ValueError(f"{src}: no tensor of a supported type to perturb")
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        shutil.copyfile(src, tmp)
        data = np.memmap(tmp, dtype=np.uint8, mode="r+")
        for _name, offsets, mask in plan:
            data[offsets] ^= np.uint8(mask)
        data.flush()
        del data
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    changed = sum(int(offsets.size) for _n, offsets, _m in plan)
    if check:
        found = _check_variant(reader, src, dst)
        if found != changed:
            raise AssertionError(f"expected {changed} changed bytes, found {found}")
    return changed


def check_variant(src: pathlib.Path, dst: pathlib.Path) -> int:
    """Assert ``dst`` is a weights-only variant of ``src``; return bytes changed.

    Checks, via ``gguf.GGUFReader``, that architecture, metadata keys, tensor
    names, types, shapes and offsets match, that everything before the tensor
    data is byte-identical, that all differences lie inside tensor data, and
    that there is at least one.
    """
    return _check_variant(gguf.GGUFReader(src), src, dst)


def _check_variant(a: gguf.GGUFReader, src: pathlib.Path, dst: pathlib.Path) -> int:
    b = gguf.GGUFReader(dst)
    arch_a = a.fields["general.architecture"].contents()
    arch_b = b.fields["general.architecture"].contents()
    assert arch_a == arch_b, (arch_a, arch_b)
    assert list(a.fields) == list(b.fields), "metadata keys differ"
    assert a.data_offset == b.data_offset, "tensor data offset differs"
    assert len(a.tensors) == len(b.tensors), "tensor count differs"
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name, (ta.name, tb.name)
        assert ta.tensor_type == tb.tensor_type, ta.name
        assert list(ta.shape) == list(tb.shape), ta.name
        assert (ta.data_offset, ta.n_bytes) == (tb.data_offset, tb.n_bytes), ta.name
    ra = np.memmap(src, dtype=np.uint8, mode="r")
    rb = np.memmap(dst, dtype=np.uint8, mode="r")
    assert ra.size == rb.size, "file sizes differ"
    diff = np.flatnonzero(ra != rb)
    assert diff.size > 0, "files are identical"
    assert int(diff[0]) >= a.data_offset, "header bytes differ"
    # Every difference must fall inside some tensor's data.
    starts = np.array(sorted(int(t.data_offset) for t in a.tensors), dtype=np.int64)
    ends = {int(t.data_offset): int(t.data_offset) + int(t.n_bytes) for t in a.tensors}
    owner = starts[np.searchsorted(starts, diff, side="right") - 1]
    limit = np.array([ends[int(s)] for s in owner], dtype=np.int64)
    assert bool(np.all(diff < limit)), "difference outside tensor data"
    return int(diff.size)


def make_truncated(src: pathlib.Path, dst: pathlib.Path, keep_bytes: int) -> None:
    """Write the first ``keep_bytes`` bytes of ``src`` to ``dst``."""
    size = pathlib.Path(src).stat().st_size
    if not 0 <= keep_bytes < size:
        raise ValueError(f"keep_bytes must be in [0, {size}), got {keep_bytes}")
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        remaining = keep_bytes
        while remaining:
            chunk = fin.read(min(remaining, 1 << 20))
            if not chunk:
                break
            fout.write(chunk)
            remaining -= len(chunk)


def make_not_gguf(dst: pathlib.Path, size: int = 65536) -> None:
    """Write ``size`` deterministic bytes that are not a GGUF file to ``dst``."""
    pattern = b"this is not a GGUF model file\n"
    data = (pattern * (size // len(pattern) + 1))[:size]
    pathlib.Path(dst).write_bytes(data)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("variant", help="perturb weights, keep everything else")
    p.add_argument("src", type=pathlib.Path)
    p.add_argument("dst", type=pathlib.Path)
    p.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    p.add_argument("--no-check", action="store_true")
    p = sub.add_parser("truncated", help="keep only the first KEEP_BYTES bytes")
    p.add_argument("src", type=pathlib.Path)
    p.add_argument("dst", type=pathlib.Path)
    p.add_argument("keep_bytes", type=int)
    p = sub.add_parser("not-gguf", help="write a file that is not GGUF")
    p.add_argument("dst", type=pathlib.Path)
    p.add_argument("--size", type=int, default=65536)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.cmd == "variant":
        n = make_variant(args.src, args.dst, stride=args.stride, check=not args.no_check)
        print(f"{args.dst}: {n} bytes perturbed", end="")
    elif args.cmd == "truncated":
        make_truncated(args.src, args.dst, args.keep_bytes)
        print(f"{args.dst}: {args.keep_bytes} bytes kept", end="")
    else:
        make_not_gguf(args.dst, args.size)
        print(f"{args.dst}: {args.size} bytes", end="")
    print(f" ({time.perf_counter() - start:.2f}s)", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
