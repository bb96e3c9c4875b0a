"""A seeded structure-aware mutator over a real snapshot: each case edits the inner records (cell counts,
positions, sequence ids, layer count, types, row sizes, header tokens, state sizes, parameters), recomputes
the checksum as anyone who can write a file can, and restores the result. Either it loads, and the context
holds the tokens its header records, or it raises a SessionError and the context is exactly as it was."""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass, field

import xxhash

from llama_sessions import Context, Model, SessionError

from conftest import assert_same_output

PROMPT = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
MORE = "<|im_start|>user\nAnd three animals?<|im_end|>\n<|im_start|>assistant\n"
#: One thread: on a loaded machine (two shared cores) a second thread mostly waits at barriers.
PARAMS = {"n_ctx": 256, "n_batch": 64, "n_threads": 1}
CASES = 300
#: Every this many refused cases, the refused context's next greedy answer is compared with a twin's.
GENERATE_EVERY = 30
SEED = 20261130
#: ggml type ids and SmolLM2's rows: f16 K and V, 3 KV heads of 64 values.
F16 = 1
ROW_VALUES = 192


def prepared(model: Model) -> Context:
    ctx = Context(model, **PARAMS)  # type: ignore[arg-type]
    assert ctx.generate(PROMPT, max_tokens=4, temperature=0) != ""
    return ctx


def answer(ctx: Context) -> str:
    text = ctx.generate(MORE, max_tokens=6, temperature=0)
    assert text != ""
    return text


@dataclass(frozen=True)
class Field:
    """One fixed-width integer of llama.cpp's state: where it is and how it is packed."""

    name: str
    offset: int
    fmt: str


def state_fields(state: bytes) -> list[Field]:
    """Every record field of a one-sequence, one-stream state with V transposed (no flash attention), read
    from the state itself; the layout is asserted to be SmolLM2's."""
    fields = [Field("magic", 0, "<I"), Field("saved_seq", 4, "<i"), Field("n_stream", 8, "<I")]
    (n_stream, n_cells) = struct.unpack_from("<II", state, 8)
    assert n_stream == 1
    fields.append(Field("cell_count", 12, "<I"))
    at = 16
    for i in range(n_cells):
        fields += [Field(f"cell {i} position", at, "<i"), Field(f"cell {i} n_seq_id", at + 4, "<I")]
        fields.append(Field(f"cell {i} sequence id", at + 8, "<i"))
        at += 12
    v_trans, n_layer = struct.unpack_from("<II", state, at)
    assert (v_trans, n_layer) == (1, 30)
    for name in ("v_trans", "layer count", "K rotation", "V rotation"):
        fields.append(Field(name, at, "<I"))
        at += 4
    for layer in range(n_layer):
        k_type, k_row = struct.unpack_from("<iQ", state, at)
        assert (k_type, k_row) == (F16, 2 * ROW_VALUES)
        fields += [Field(f"K type {layer}", at, "<i"), Field(f"K row bytes {layer}", at + 4, "<Q")]
        at += 12 + n_cells * k_row
    for layer in range(n_layer):
        v_type, element, width = struct.unpack_from("<iII", state, at)
        assert (v_type, element, width) == (F16, 2, ROW_VALUES)
        fields += [Field(f"V type {layer}", at, "<i"), Field(f"V element bytes {layer}", at + 4, "<I")]
        fields.append(Field(f"V width {layer}", at + 8, "<I"))
        at += 12 + n_cells * element * width
    assert at == len(state)
    return fields


@dataclass
class Session:
    """A session taken apart: its header and its one sequence's state."""

    header: dict[str, object]
    state: bytearray
    #: The state_bytes to record, when an edit chose one (otherwise the state's length).
    state_bytes: int | None = None
    edits: list[str] = field(default_factory=list)

    @staticmethod
    def parse(data: bytes) -> Session:
        (header_len,) = struct.unpack_from("<I", data, 12)
        header = json.loads(data[32 : 32 + header_len])
        return Session(header, bytearray(data[32 + header_len : -16]))

    def sequence(self) -> dict[str, object]:
        sequences = self.header["sequences"]
        assert isinstance(sequences, list)
        first = sequences[0]
        assert isinstance(first, dict)
        return first

    def tokens(self) -> list[int]:
        tokens = self.sequence()["tokens"]
        assert isinstance(tokens, list)
        return tokens

    def encode(self) -> bytes:
        """The session bytes, with the prelude's lengths and check and the checksum recomputed."""
        self.sequence()["state_bytes"] = len(self.state) if self.state_bytes is None else self.state_bytes
        header = json.dumps(self.header, separators=(",", ":")).encode()
        prelude = bytearray(b"\x89LLSESS\n" + struct.pack("<IIQ", 1, len(header), len(self.state)))
        prelude += xxhash.xxh3_64_intdigest(bytes(prelude)).to_bytes(8, "little")
        body = bytes(prelude) + header + bytes(self.state)
        return body + xxhash.xxh3_128_intdigest(body).to_bytes(16, "little")


def near(rng: random.Random, value: int) -> int:
    """A value a forger would try: next to the original, zero, negative, a type boundary, or random."""
    return rng.choice(
        [
            value + 1,
            value - 1,
            0,
            -1,
            -(2**31),
            2**31 - 1,
            2**31,
            2**32 - 1,
            rng.randrange(300),
            rng.getrandbits(32),
        ]
    )


def edit(rng: random.Random, session: Session, fields: list[Field], vocab: int) -> None:
    """One edit of the inner records, chosen by `rng`; its description goes to session.edits."""
    kind = rng.randrange(12)
    if kind < 5:
        # A field of the state (cells most often: there are the most of them).
        cells = [f for f in fields if f.name.startswith("cell")]
        chosen = rng.choice(cells if kind < 3 else fields)
        if chosen.offset + struct.calcsize(chosen.fmt) > len(session.state):
            return
        (old,) = struct.unpack_from(chosen.fmt, session.state, chosen.offset)
        bits = 8 * struct.calcsize(chosen.fmt)
        new = near(rng, old) % 2**bits
        struct.pack_into(chosen.fmt.upper(), session.state, chosen.offset, new)
        session.edits.append(f"{chosen.name} {old} -> {new}")
    elif kind == 5:
        cut = rng.choice([1, 4, 12, rng.randrange(1, len(session.state))])
        del session.state[len(session.state) - cut :]
        session.edits.append(f"state cut by {cut} bytes")
    elif kind == 6:
        extra = rng.randbytes(rng.choice([1, 4, 12]))
        position = rng.choice([len(session.state), fields[3].offset + 4])
        session.state[position:position] = extra
        session.edits.append(f"{len(extra)} bytes inserted at {position}")
    elif kind == 7:
        # A byte of the last V payload: nothing checks values, so this one may load.
        start = fields[-1].offset + 4
        if start >= len(session.state):
            return
        at = rng.randrange(start, len(session.state))
        session.state[at] ^= 1 << rng.randrange(8)
        session.edits.append(f"payload byte {at} flipped")
    elif kind == 8:
        tokens = session.tokens()
        i = rng.randrange(len(tokens))
        tokens[i] = rng.choice([rng.randrange(vocab), vocab, -1, 2**31 - 1])
        session.edits.append(f"header token {i} -> {tokens[i]}")
    elif kind == 9:
        tokens = session.tokens()
        if rng.random() < 0.5:
            tokens.pop()
            session.edits.append("header token dropped")
        else:
            tokens.append(rng.randrange(vocab))
            session.edits.append("header token added")
    elif kind == 10:
        session.state_bytes = near(rng, len(session.state)) % 2**64
        session.edits.append(f"state_bytes -> {session.state_bytes}")
    else:
        params = session.header["params"]
        assert isinstance(params, dict)
        name, record = rng.choice([("seq", session.sequence()), ("n_seq_max", params), ("n_ctx", params)])
        old = record[name]
        assert isinstance(old, int)
        record[name] = near(rng, old) % 2**32
        session.edits.append(f"{name} {old} -> {record[name]}")


def test_restoring_structure_aware_mutations_loads_exactly_or_changes_nothing(model: Model) -> None:
    original = prepared(model).snapshot()
    fields = state_fields(bytes(Session.parse(original).state))
    expected_answer = answer(prepared(model))
    target = prepared(model)
    before = target.tokens
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {}
    refused = 0
    for case in range(CASES):
        session = Session.parse(original)
        while not session.edits:
            for _ in range(rng.choice([1, 1, 2, 3])):
                edit(rng, session, fields, model.n_vocab)
        data = session.encode()
        what = f"case {case}: {'; '.join(session.edits)}"
        try:
            target.restore(data)
        except SessionError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            assert target.tokens == before, what
            refused += 1
            if refused % GENERATE_EVERY == 0:
                assert_same_output(answer(target), expected_answer)
                target.restore(original)
            continue
        outcomes["loaded"] = outcomes.get("loaded", 0) + 1
        assert target.tokens == session.tokens(), what
        target.restore(original)
        assert target.tokens == before
    # Both sides were reached, and every refusal was a SessionError (anything else fails above).
    assert outcomes.get("loaded", 0) > 0, outcomes
    assert outcomes.get("SessionCorruptError", 0) > CASES // 2, outcomes
    assert outcomes.get("SessionParamsMismatchError", 0) > 0, outcomes
    assert refused >= GENERATE_EVERY * 5, outcomes
