"""How often a continuation from cached chunks agrees with a fresh prefill (issue 11: measured, not asserted).

Chunks hold the KV rows of whoever computed them first. A context that restores them and decodes the rest
holds exactly those rows; a fresh prefill of the same prompt computes them again with other batch boundaries
(here the chunks were written by a context decoding 128 tokens per call, the fresh prefills decode 512), so
its rows may differ in the last bits of a float, and a greedy continuation may then take another token. For
``--prompts`` prompts of ``TOTAL`` tokens sharing their first ``SHARED`` with the prompt whose chunks are
cached, compare the greedy continuation (``--tokens`` tokens) of both ways: identical sequences, and the
mean length of their common prefix. Timing plays no part, so a busy machine does not change the result.

Run: python bench/chunk_agreement.py [--prompts 20] [--tokens 32]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from typing import Any

from _common import THREADS, environment, shared_prefix_prompts, work_dir, write_result
from llama_sessions import Context, Model, PrefixCache, default_model_path

SHARED = 768
TOTAL = 900
CHUNK = 256
N_CTX = 2048
WRITER_BATCH = 128
COMMAND = "python bench/chunk_agreement.py"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    env = environment()
    model = Model.load(default_model_path())
    shared_text, tail_a, tails_b = shared_prefix_prompts(model, SHARED, TOTAL, args.prompts)
    cache_dir = work_dir() / "chunk-agreement"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache = PrefixCache(cache_dir, chunk_tokens=CHUNK)
    writer = Context(model, n_ctx=N_CTX, n_batch=WRITER_BATCH, n_threads=THREADS, prefix_cache=cache)
    writer.generate(shared_text + tail_a, max_tokens=0)

    agree = 0
    prefixes: list[int] = []
    restored: list[int] = []
    for i, tail in enumerate(tails_b):
        prompt = shared_text + tail
        from_chunks = Context(model, n_ctx=N_CTX, n_threads=THREADS, prefix_cache=cache)
        from_chunks.generate(prompt, max_tokens=args.tokens, temperature=0.0)
        stats = from_chunks.last_stats
        assert stats is not None
        prompt_len = len(model.tokenize(prompt))
        restored.append(prompt_len - stats.prompt_tokens)
        fresh = Context(model, n_ctx=N_CTX, n_threads=THREADS)
        fresh.generate(prompt, max_tokens=args.tokens, temperature=0.0)
        a, b = from_chunks.tokens[prompt_len:], fresh.tokens[prompt_len:]
        assert a and b, "both continuations are non-empty"
        same = a == b
        agree += same
        prefixes.append(common_prefix(a, b))
        print(f"prompt {i}: {'agree' if same else f'differ after {prefixes[-1]} tokens'}", flush=True)
    data: dict[str, Any] = {
        "environment": env,
        "command": COMMAND,
        "config": {
            "shared_tokens": SHARED,
            "total_tokens": TOTAL,
            "chunk_tokens": CHUNK,
            "writer_n_batch": WRITER_BATCH,
            "reader_n_batch": 512,
            "n_ctx": N_CTX,
            "prompts": args.prompts,
            "continuation_tokens": args.tokens,
        },
        "restored_tokens": restored,
        "agree": agree,
        "mean_common_prefix": statistics.mean(prefixes),
        "common_prefixes": prefixes,
    }
    write_result("chunk_agreement", data)
    print(
        f"{agree} of {args.prompts} greedy continuations of {args.tokens} tokens agree; mean common prefix "
        f"{statistics.mean(prefixes):.1f} tokens"
    )


if __name__ == "__main__":
    main()
