"""The demo model generator: deterministic bytes, the advertised sizes, a working tokenizer."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
from tokenizers import Tokenizer

from kvmesh.models import demo


def digest(path: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_generation_is_byte_identical(tmp_path: pathlib.Path) -> None:
    a = demo.generate("tiny", tmp_path / "a")
    b = demo.generate("tiny", tmp_path / "b")
    assert digest(a) == digest(b)
    assert demo.is_complete(a)


def test_sizes() -> None:
    assert 2e6 <= demo.SPECS["tiny"].num_params() <= 10e6
    assert 90e6 <= demo.SPECS["small"].num_params() <= 120e6


def test_safetensors_layout_and_bf16_rounding(tmp_path: pathlib.Path) -> None:
    out = demo.generate("tiny", tmp_path / "m")
    raw = (out / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    spec = demo.SPECS["tiny"]
    assert header["model.embed_tokens.weight"]["shape"] == [spec.vocab, spec.hidden]
    assert all(v["dtype"] == "BF16" for k, v in header.items() if k != "__metadata__")
    assert len(raw) == 8 + n + 2 * spec.num_params()
    # round-to-nearest-even: 1 + 2^-8 is a tie and rounds down; 1 + 3*2^-8 rounds up
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5], dtype=np.float32)
    got = np.frombuffer(demo._to_bf16_bytes(x), dtype="<u2")
    assert list(got) == [0x3F80, 0x3F80, 0x3F82, 0xC020]


def test_tokenizer_round_trip_and_specials(tmp_path: pathlib.Path) -> None:
    out = demo.generate("tiny", tmp_path / "m")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "Hello kvmesh! 你好 — def f(x): return x\n"
    enc = tok.encode(text)
    assert enc.ids[0] == tok.token_to_id(demo.BOS)
    assert tok.decode(enc.ids) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|start_header_id|>" in cfg["chat_template"]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [
        tok.token_to_id(demo.EOS), tok.token_to_id(demo.EOT)]
