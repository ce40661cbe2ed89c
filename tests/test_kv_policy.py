"""KV-aware, prefix and session policies on synthetic states (no I/O)."""

from __future__ import annotations

import collections
import random

from prometheus_client import CollectorRegistry

from kvmesh.config import RoutingConfig
from kvmesh.index.events import BlockStored, EventBatch
from kvmesh.index.index import KvIndex
from kvmesh.routing import CandidateState as Cand
from kvmesh.routing import RequestContext, make_policy

BS = 16



def ctx(tokens: list[int], session: str | None = None) -> RequestContext:
    return RequestContext(request_id="r", model="m", endpoint="completions", token_ids=tokens,
                          prompt_tokens_estimate=len(tokens), session_id=session)


def warm(idx: KvIndex, engine: str, tokens: list[int]) -> None:
    n = len(tokens) // BS
    idx.apply(engine, EventBatch(0.0, [BlockStored(block_hashes=list(range(1, n + 1)), parent_block_hash=None,
                                                   token_ids=tokens[: n * BS], block_size=BS)]))


def route(policy, cands: list[Cand], c: RequestContext) -> Cand:  # type: ignore[no-untyped-def]
    """Route like the gateway does: choose, commit, account the prefill as pending (never finished)."""
    d = policy.choose(c, cands)
    b = d.backend
    policy.on_routed(c, d)
    b.pending_prefill_tokens += d.prefill_tokens
    b.in_flight += 1
    return b  # type: ignore[no-any-return]


def test_affinity_wins_at_equal_load() -> None:
    idx = KvIndex("m")
    p = make_policy("kv-aware", seed=1, index=idx)
    prompt = list(range(1000, 1000 + 20 * BS))
    warm(idx, "b", prompt)
    d = p.choose(ctx([*prompt, 1, 2, 3]), [Cand("a"), Cand("b"), Cand("c")])
    assert d.backend.name == "b"


def test_shared_first_block_does_not_create_a_hot_spot() -> None:
    # The Mooncake trace: every request shares block 0, the rest differs.
    idx = KvIndex("m")
    p = make_policy("kv-aware", seed=2, index=idx)
    rng = random.Random(0)
    first = list(range(BS))
    warm(idx, "e0", first)
    cands = [Cand(f"e{i}") for i in range(4)]
    for _ in range(200):
        route(p, cands, ctx(first + [rng.randrange(8000) for _ in range(30 * BS)]))
    counts = [c.in_flight for c in cands]
    assert max(counts) - min(counts) <= 2, counts


def test_load_beats_affinity_when_the_warm_replica_is_saturated() -> None:
    idx = KvIndex("m")
    p = make_policy("kv-aware", seed=3, index=idx, cfg=RoutingConfig(prefill_tps=1000))
    prompt = list(range(10 * BS))
    warm(idx, "warm", prompt)
    cold, hot = Cand("cold"), Cand("warm", pending_prefill_tokens=5000, in_flight=8)
    assert p.choose(ctx(prompt), [cold, hot]).backend.name == "cold"
    hot.pending_prefill_tokens, hot.in_flight = 0, 0
    assert p.choose(ctx(prompt), [cold, hot]).backend.name == "warm"


def test_ties_are_broken_without_bias() -> None:
    p = make_policy("kv-aware", seed=4, index=KvIndex("m"))
    picks = collections.Counter(p.choose(ctx(list(range(64))), [Cand("a"), Cand("b")]).backend.name
                                for _ in range(2000))
    assert 900 <= picks["a"] <= 1100, picks  # binomial(2000, 0.5): ±4.5 sigma


def test_speculative_insertion_keeps_a_burst_together() -> None:
    idx = KvIndex("m")
    idx.block_size = BS  # as if events had been seen, but none for this prefix yet
    p = make_policy("kv-aware", seed=5, index=idx)
    cands = [Cand("a"), Cand("b"), Cand("c")]
    doc = list(range(2000, 2000 + 40 * BS))
    first = route(p, cands, ctx([*doc, 1]))
    # the burst follows the first request until its queue outweighs the cached prefix
    b = p.choose(ctx([*doc, 2]), cands).backend
    assert b.name == first.name


def test_degrades_to_load_and_counts_why() -> None:
    reg = CollectorRegistry()
    p = make_policy("kv-aware", seed=6, index=KvIndex("m"), registry=reg)
    busy, idle = Cand("busy", in_flight=3, pending_prefill_tokens=900), Cand("idle")
    no_tokens = RequestContext(request_id="r", model="m", endpoint="chat", prompt_tokens_estimate=100)
    assert p.choose(no_tokens, [busy, idle]).backend.name == "idle"
    assert p.choose(ctx(list(range(100))), [busy, idle]).backend.name == "idle"
    assert reg.get_sample_value("kvmesh_routing_degraded_total", {"policy": "kv-aware", "reason": "no_tokens"}) == 1
    assert reg.get_sample_value("kvmesh_routing_degraded_total",
                                {"policy": "kv-aware", "reason": "no_block_size"}) == 1


def test_learns_prefill_throughput_from_ttft() -> None:
    p = make_policy("kv-aware", index=KvIndex("m"), cfg=RoutingConfig(prefill_tps=1000))
    c = ctx(list(range(4000)))
    d = p.choose(c, [Cand("a")])
    assert d.prefill_tokens == 4000  # nothing cached: the whole prompt
    for _ in range(30):
        p.on_first_token(c, d, 0.5, queued_tokens=0)  # 4000 tokens in 0.5 s = 8000 tok/s
    assert 7500 < p.model.tps("a") <= 8000  # type: ignore[attr-defined]
    p.on_first_token(c, d, 50.0, queued_tokens=1000)  # it queued: not a throughput sample
    assert p.model.tps("a") > 7500  # type: ignore[attr-defined]


def test_prefix_policy_learns_from_routing_without_events() -> None:
    p = make_policy("prefix", seed=7)
    cands = [Cand("a"), Cand("b"), Cand("c")]
    doc = list(range(50 * 128))
    first = route(p, cands, ctx(doc))
    for c in cands:
        c.pending_prefill_tokens = c.in_flight = 0  # the first request has finished
    assert p.choose(ctx([*doc, 1, 2]), cands).backend.name == first.name


def test_session_affinity_with_overload_fallback() -> None:
    p = make_policy("session", seed=8, cfg=RoutingConfig(session_slack=2))
    a, b = Cand("a"), Cand("b")
    first = p.choose(ctx([1], session="s1"), [a, b]).backend
    for _ in range(5):
        assert p.choose(ctx([1], session="s1"), [a, b]).backend is first
    first.in_flight = 10  # overloaded: the session moves and stays moved
    moved = p.choose(ctx([1], session="s1"), [a, b]).backend
    assert moved is not first
    first.in_flight = 0
    assert p.choose(ctx([1], session="s1"), [a, b]).backend is moved
