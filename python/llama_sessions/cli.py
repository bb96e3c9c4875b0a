"""The ``llama-sessions`` command line.

``llama-sessions demo`` runs the main job on the default model; ``llama-sessions fetch-model`` only puts the
default model in the cache and prints its path.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._fetch import default_model_path
from ._native import Context, Model
from .errors import LlamaSessionsError

#: A long system prompt, as a real assistant would have: the cost of reading it is what sessions save.
DEMO_SYSTEM_PROMPT = """You are Atlas, the support assistant of a small company that builds weather stations.
Follow these rules in every answer:
1. Be concise: answer in at most three sentences unless the user asks for detail.
2. Be accurate: if you do not know something, say so instead of guessing.
3. Be friendly and professional; never use slang.
4. When the user asks about installation, remind them to mount the station at least two meters above ground,
   away from walls and trees, and to point the solar panel south in the northern hemisphere.
5. When the user asks about batteries, explain that the station uses two AA lithium cells that last about
   two years, and that rechargeable cells are not supported in freezing weather.
6. When the user asks about connectivity, explain that the station talks to its base unit on 868 MHz with a
   range of about 100 meters in the open, and that the base unit joins Wi-Fi on 2.4 GHz only.
7. When the user asks about data, explain that readings are stored for one year on the base unit and can be
   exported as CSV from the web interface.
8. When the user reports a fault, ask for the serial number, the firmware version and a description of the
   problem, and suggest restarting the base unit first.
9. Never promise refunds or replacements; direct those requests to the warranty team.
10. End every answer by asking whether there is anything else you can help with.
Product facts: the Atlas S2 measures temperature, humidity, pressure, wind speed, wind direction and
rainfall. The sensors are calibrated at the factory. Firmware updates install automatically at night.
The web interface runs on the base unit at http://atlas.local and needs no account."""

DEMO_QUESTION = "How high should I mount the station, and which way should the solar panel face?"


def _model_path(given: str | None) -> Path:
    return Path(given) if given else default_model_path(progress=True)


def demo(args: argparse.Namespace) -> int:
    """Encode a long system prompt, answer a question, and print prefill and generation speed."""
    path = _model_path(args.model)
    started = time.perf_counter()
    model = Model.load(path)
    print(f"model     {path.name}  ({model.architecture}, {model.n_layer} layers)")
    print(f"          fingerprint {model.fingerprint}")
    print(f"loaded in {time.perf_counter() - started:.2f} s")
    ctx = Context(model, n_ctx=args.n_ctx)
    system = model.apply_chat_template(
        [{"role": "system", "content": DEMO_SYSTEM_PROMPT}], add_generation_prompt=False
    )
    ctx.generate(system, max_tokens=0)
    prefill = ctx.last_stats
    assert prefill is not None
    print(
        f"prefill   {prefill.prompt_tokens} tokens of system prompt in {prefill.prompt_seconds:.2f} s "
        f"({prefill.prompt_tokens_per_second:.0f} tokens/s)"
    )
    turn = model.apply_chat_template([{"role": "user", "content": DEMO_QUESTION}])
    print(f"\nuser      {DEMO_QUESTION}\nassistant ", end="", flush=True)
    for piece in ctx.stream(turn, max_tokens=args.max_tokens, temperature=0):
        print(piece, end="", flush=True)
    print()
    answer = ctx.last_stats
    assert answer is not None
    print(
        f"\nquestion  {answer.prompt_tokens} tokens in {answer.prompt_seconds:.2f} s "
        f"({answer.prompt_tokens_per_second:.0f} tokens/s)"
    )
    print(
        f"generate  {answer.generated_tokens} tokens in {answer.generation_seconds:.2f} s "
        f"({answer.generation_tokens_per_second:.1f} tokens/s, stopped by {answer.stop_reason})"
    )
    print(f"context   {ctx.token_count()} of {ctx.n_ctx} tokens held")
    return 0


def fetch_model(args: argparse.Namespace) -> int:
    """Put the default model in the cache and print its path."""
    print(default_model_path(progress=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-sessions", description="Resumable local LLM inference with llama.cpp."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="encode a long system prompt, answer, report speed")
    demo_parser.add_argument("--model", help="GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    demo_parser.add_argument("--n-ctx", type=int, default=4096, help="context size (default 4096)")
    demo_parser.add_argument("--max-tokens", type=int, default=96, help="most tokens to answer with")
    demo_parser.set_defaults(run=demo)
    fetch_parser = commands.add_parser("fetch-model", help="cache the default model and print its path")
    fetch_parser.set_defaults(run=fetch_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llama-sessions`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except LlamaSessionsError as error:
        print(f"llama-sessions: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return code
