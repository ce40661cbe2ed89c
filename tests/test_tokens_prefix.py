"""The token prefix cache is exact: ids and block keys equal a full encode, whatever the cache holds."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmesh.index.hashing import block_keys
from kvmesh.models import demo
from kvmesh.tokenize import PromptTokenizer
from kvmesh.tokenize.prefix import PrefixCache, reuse_supported
from kvmesh.workloads import load_mooncake

TRACE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"
BS, SEED = 16, 12345

# pieces that stress pre-token boundaries: runs of spaces and newlines, digits next to letters, contractions,
# punctuation runs, non-ASCII (accents, combining marks, CJK, emoji) and the chat template's special tokens
PIECES = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", " \n ", "w12", "w", "34", "hello", " world", "'s", "'ll",
                          "!!", "...", ",", "é", "e\u0301", "日本語", "🙂", "<|eot_id|>", "<|start_header_id|>",
                          "x" * 40, "3.14159", "—", " w5000 w17"])
TEXT = st.lists(PIECES, min_size=0, max_size=120).map("".join)


@pytest.fixture(scope="module")
def tok(tok_dir: pathlib.Path) -> PromptTokenizer:
    t = PromptTokenizer(tok_dir, cache_entries=64, cache_tokens=20_000)
    assert t.cache is not None, "the demo tokenizer (ByteLevel BPE) supports prefix reuse"
    return t


def full(tok: PromptTokenizer, text: str, special: bool) -> list[int]:
    ids: list[int] = tok.tok.encode(text, add_special_tokens=special).ids
    return ids


def check(tok: PromptTokenizer, text: str, special: bool) -> int:
    out = tok.encode(text, special, BS, SEED)
    want = full(tok, text, special)
    assert out.ids == want
    assert out.keys == block_keys(want, BS, SEED)
    return out.reused


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=TEXT, turns=st.lists(st.tuples(st.integers(0, 10_000), TEXT), min_size=1, max_size=6),
       special=st.booleans())
def test_random_extensions_are_exact(tok: PromptTokenizer, base: str, turns: list[tuple[int, str]],
                                     special: bool) -> None:
    """Each text cuts the previous one anywhere (even mid-word) and appends more."""
    text = base
    check(tok, text, special)
    for cut, more in turns:
        text = text[: cut % (len(text) + 1)] + more
        check(tok, text, special)


def test_multi_turn_chat_reuses_history(tok: PromptTokenizer) -> None:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are terse. " * 30}]
    reused = []
    for turn in range(8):
        msgs.append({"role": "user", "content": f"question {turn}: " + "why w12 is 34? " * (5 + turn)})
        text = tok.render_chat(msgs)
        out = tok.encode(text, False, BS, SEED)
        assert out.ids == full(tok, text, False) == tok.encode_chat(msgs)
        assert out.keys == block_keys(out.ids, BS, SEED)
        reused.append(out.reused)
        msgs.append({"role": "assistant", "content": f"answer {turn} " * 20})
    assert reused[0] == 0
    assert all(r > 0 for r in reused[1:]), reused


def test_exact_repeat_and_other_block_params(tok: PromptTokenizer) -> None:
    text = "the same document, sent again " * 40
    first = tok.encode(text, True, BS, SEED)
    again = tok.encode(text, True, BS, SEED)
    assert again.ids == first.ids and again.keys == first.keys and again.reused == len(first.ids) - 1
    other = tok.encode(text, True, 32, 7)  # cached keys are for another block size and seed
    assert other.keys == block_keys(first.ids, 32, 7)


def test_failed_overlap_check_falls_back_to_a_full_encode(tok: PromptTokenizer) -> None:
    text = "alpha beta gamma delta " * 30
    tok.encode(text, False)
    plan = tok.plan(text + " epsilon")
    assert plan.entry is not None and plan.overlap
    plan.overlap = [x + 1 for x in plan.overlap]  # as if the suffix encoded differently on its own
    out = tok.finish(plan, False, BS, SEED)
    assert out.reused == 0
    assert out.ids == full(tok, text + " epsilon", False)


def test_cache_bounds(tok_dir: pathlib.Path) -> None:
    t = PromptTokenizer(tok_dir, cache_entries=4, cache_tokens=600)
    assert t.cache is not None
    for i in range(12):
        t.encode(f"document {i} " + "w1 w2 w3 " * 20, False)
    assert len(t.cache) <= 4
    assert t.cache._tokens <= 600


def test_without_prefix_cache_every_text_is_encoded(tok_dir: pathlib.Path) -> None:
    t = PromptTokenizer(tok_dir, prefix_cache=False)
    text = "w1 w2 w3 " * 50
    assert t.cache is None
    assert t.encode(text, True).reused == 0 and t.encode(text + "x", True).reused == 0


def test_tokenizers_that_split_differently_at_a_cut_are_not_reused() -> None:
    cfg: dict[str, Any] = json.loads(demo.tokenizer_json())
    assert reuse_supported(cfg)
    prefix_space = {**cfg, "pre_tokenizer": {**cfg["pre_tokenizer"], "add_prefix_space": True}}
    metaspace = {**cfg, "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}}
    stripping = {**cfg, "normalizer": {"type": "Strip", "strip_left": True, "strip_right": True}}
    dropout = {**cfg, "model": {**cfg["model"], "dropout": 0.1}}
    for bad in (prefix_space, metaspace, stripping, dropout):
        assert not reuse_supported(bad)


def test_prefix_cache_finds_the_longest_shared_prefix() -> None:
    c = PrefixCache()
    assert c.plan("anything").entry is None


@pytest.mark.skipif(not TRACE.is_file(), reason=f"the Mooncake trace is absent ({TRACE})")
def test_mooncake_prompts_are_exact(tok_dir: pathlib.Path) -> None:
    from kvmesh.bench.compare import prompt

    t = PromptTokenizer(tok_dir)
    reused = 0
    for r in load_mooncake(TRACE, 150):
        text = prompt(r)
        out = t.encode(text, True, BS, SEED)
        assert out.ids == full(t, text, True)
        assert out.keys == block_keys(out.ids, BS, SEED)
        reused += out.reused
    assert reused > 0
