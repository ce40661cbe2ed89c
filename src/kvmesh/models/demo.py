"""Deterministic demo model: a Llama-architecture checkpoint with random weights and kvmesh's own tokenizer.

Nothing is downloaded: weights come from NumPy's PCG64 generator seeded per tensor (so the order tensors are
generated in does not matter), and the byte-level BPE tokenizer is package data.  The same command gives
byte-identical files on any machine, which is what lets tests and benchmarks be reproduced.

We write the safetensors file ourselves instead of going through torch: the format is an 8-byte header
length, a JSON header and raw little-endian bytes, and doing it here keeps torch out of kvmesh's own
dependencies (it arrives only with an engine) and makes the byte layout explicit.
"""

from __future__ import annotations

import json
import pathlib
import zlib
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np

DemoSize = Literal["tiny", "small"]
SEED = 20261124
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"


@dataclass(frozen=True, slots=True)
class DemoSpec:
    """Architecture of one demo size (Llama layout, grouped-query attention)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int
    vocab: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for _, shape in tensor_shapes(self))


SPECS: dict[str, DemoSpec] = {
    # ~2.6 M parameters: starts in seconds, for tests.
    "tiny": DemoSpec(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512, max_positions=4096),
    # ~107 M parameters: prefill cost on a CPU is realistic (seconds for thousands of tokens).
    "small": DemoSpec(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816, max_positions=8192),
}


def tensor_shapes(spec: DemoSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of every tensor, in Hugging Face's Llama naming."""
    h, kv = spec.hidden, spec.kv_heads * spec.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (spec.intermediate, h)),
            (f"{p}.mlp.up_proj.weight", (spec.intermediate, h)),
            (f"{p}.mlp.down_proj.weight", (h, spec.intermediate)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return shapes


def _to_bf16_bytes(x: np.ndarray) -> bytes:
    """float32 → bfloat16 with round-to-nearest-even (what torch does), as raw little-endian bytes."""
    bits = x.astype("<f4").view("<u4")
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype("<u2").tobytes()


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def write_safetensors(path: pathlib.Path, spec: DemoSpec, seed: int = SEED) -> None:
    shapes = sorted(tensor_shapes(spec))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in shapes:
            f.write(_to_bf16_bytes(_tensor(name, shape, seed)))
    tmp.replace(path)


def tokenizer_json() -> str:
    return resources.files("kvmesh.models").joinpath("data/tokenizer.json").read_text(encoding="utf-8")


def _hf_config(spec: DemoSpec, tok: dict[str, int]) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_positions,
        "vocab_size": spec.vocab,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": tok[BOS],
        "eos_token_id": [tok[EOS], tok[EOT]],
    }


def generate(size: DemoSize, out: pathlib.Path, seed: int = SEED) -> pathlib.Path:
    """Write the demo model of ``size`` into ``out`` (created if needed); returns ``out``.

    Raises ``ValueError`` for an unknown size.  Files are written to temporary names and renamed, so an
    interrupted run never leaves a directory that looks complete (``model.safetensors`` is written last).
    """
    if size not in SPECS:
        raise ValueError(f"unknown demo size {size!r}; choose one of {', '.join(SPECS)}")
    spec = SPECS[size]
    out.mkdir(parents=True, exist_ok=True)
    tok_text = tokenizer_json()
    vocab = {t["content"]: t["id"] for t in json.loads(tok_text)["added_tokens"]}
    files = {
        "config.json": _hf_config(spec, vocab),
        "generation_config.json": {"bos_token_id": vocab[BOS], "eos_token_id": [vocab[EOS], vocab[EOT]]},
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOT,
            "pad_token": EOS,
            "model_max_length": spec.max_positions,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOT, "pad_token": EOS},
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / "tokenizer.json").write_text(tok_text, encoding="utf-8")
    write_safetensors(out / "model.safetensors", spec, seed)
    return out


def is_complete(path: pathlib.Path) -> bool:
    """True when ``path`` holds a finished demo model (the weights file is renamed into place last)."""
    return (path / "model.safetensors").is_file() and (path / "config.json").is_file()
