"""Lazy tokenisation (``PromptTokenizer.encode_held``): a prompt is encoded only up to the first block no
engine holds, and what it returns is exact — its ids and keys are prefixes of a full encode's."""

from __future__ import annotations

import asyncio
import pathlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.gateway.metrics import GatewayMetrics
from kvmesh.gateway.tokens import TokenStage
from kvmesh.index.hashing import block_keys
from kvmesh.tokenize import PromptTokenizer
from kvmesh.tokenize.tokenizer import LAZY_STEP_CHARS

BS, SEED = 16, 777
WORDS = st.lists(st.sampled_from(["alpha", "beta", "w12", "3.5", "Hello,", "world!", "\n", "é", "日本", "—", "x" * 30]),
                 min_size=50, max_size=900).map(" ".join)


def reference(tok: PromptTokenizer, text: str, special: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = tok.tok.encode(text, add_special_tokens=special).ids
    return ids, [int(k) for k in block_keys(ids, BS, SEED)]


def text_of(n_words: int, salt: str) -> str:
    return " ".join(f"{salt}{i % 97} word{i}" for i in range(n_words))


def test_nothing_held_stops_after_one_step_with_an_exact_prefix(tok_dir: pathlib.Path) -> None:
    tok = PromptTokenizer(tok_dir)
    text = text_of(2000, "a")  # ~25k characters
    ids, keys = reference(tok, text, True)
    part = tok.encode_held(text, True, BS, SEED, lambda k: False)
    assert not part.complete and 0 < len(part.ids) < len(ids) // 10
    assert part.ids == ids[:len(part.ids)] and part.keys == keys[:len(part.keys)]
    assert len(part.keys) == len(part.ids) // BS
    assert abs(part.total - len(ids)) <= 0.05 * len(ids)  # estimated from characters per token


def test_everything_held_is_a_full_encode(tok_dir: pathlib.Path) -> None:
    tok = PromptTokenizer(tok_dir)
    text = text_of(1500, "b")
    ids, keys = reference(tok, text, True)
    part = tok.encode_held(text, True, BS, SEED, lambda k: True)
    assert part.complete and part.ids == ids and part.keys == keys and part.total == len(ids)


def test_stops_just_past_the_held_prefix_and_reuses_the_cache(tok_dir: pathlib.Path) -> None:
    tok = PromptTokenizer(tok_dir)
    shared = text_of(1200, "c")
    first, second = shared + " " + text_of(800, "d"), shared + " " + text_of(800, "e")
    _, first_keys = reference(tok, first, False)
    held = set(first_keys)  # the engines hold the first prompt's blocks
    tok.encode(first, False, BS, SEED)  # ... and the gateway tokenised it (the prefix cache has it)
    ids, keys = reference(tok, second, False)
    common = next(i for i, (a, b) in enumerate(zip(first_keys, keys, strict=False)) if a != b)
    part = tok.encode_held(second, False, BS, SEED, held.__contains__)
    assert not part.complete and part.keys == keys[:len(part.keys)] and part.ids == ids[:len(part.ids)]
    assert common < len(part.keys)  # went past the held blocks to the first block nobody holds ...
    assert len(part.ids) - common * BS <= LAZY_STEP_CHARS  # ... and at most about a step further


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=WORDS, cut=st.integers(0, 400), special=st.booleans())
def test_any_text_and_any_held_prefix_give_exact_prefixes(tok_dir: pathlib.Path, text: str, cut: int,
                                                          special: bool) -> None:
    tok = PromptTokenizer(tok_dir, cache_entries=16)
    ids, keys = reference(tok, text, special)
    held = set(keys[:cut])
    part = tok.encode_held(text, special, BS, SEED, held.__contains__)
    assert part.ids == ids[:len(part.ids)] and part.keys == keys[:len(part.keys)]
    if part.complete:
        assert part.keys == keys and part.total == len(ids)


def test_token_stage_completes_the_key_chain_after_a_lazy_stop(tok_dir: pathlib.Path) -> None:
    stage = TokenStage(str(tok_dir), GatewayMetrics())
    try:
        text = text_of(3000, "f")
        assert stage.tokenizer is not None
        ids, keys = reference(stage.tokenizer, text, True)
        t = asyncio.run(stage.tokens("completions", {"prompt": text}, BS, SEED, lambda k: False))
        assert t.ids is not None and t.rest is not None and len(t.ids) < len(ids)
        assert asyncio.run(stage.complete(t.rest)) == keys  # the whole chain, as a full encode cuts it
        eager = asyncio.run(stage.tokens("completions", {"prompt": text}, BS, SEED))
        assert eager.ids == ids and eager.rest is None and eager.total == len(ids)
    finally:
        stage.close()
