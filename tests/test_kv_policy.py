"""KV-aware, prefix and session policies on synthetic states (no I/O)."""

from __future__ import annotations

import collections
import random

from prometheus_client import CollectorRegistry

from kvmesh.config import RoutingConfig
from kvmesh.index.events import BlockRemoved, BlockStored, EventBatch
from kvmesh.index.index import KvIndex
from kvmesh.routing import CandidateState as Cand
from kvmesh.routing import RequestContext, make_policy
from kvmesh.routing.kv_aware import Ledger

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


def test_learns_prefill_throughput_from_every_ttft_queued_ones_included() -> None:
    p = make_policy("kv-aware", index=KvIndex("m"), cfg=RoutingConfig(prefill_tps=1000))
    c = ctx(list(range(4000)))
    d = p.choose(c, [Cand("a")])
    assert d.prefill_tokens == 4000  # nothing cached: the whole prompt
    for _ in range(30):
        p.on_first_token(c, d, 0.5, queued_tokens=0)  # 4000 tokens in 0.5 s = 8000 tok/s
    assert 7500 < p.model.tps("a") <= 8000  # type: ignore[attr-defined]
    # Under saturation every request queues: 12,000 tokens ahead + its own 4,000 in 32 s = 500 tok/s, the
    # real engine's figure (a sample that ignored the queue would say 4000 / 32 = 125).
    for _ in range(40):
        p.on_first_token(c, d, 32.0, queued_tokens=12_000)
    assert 490 < p.model.tps("a") < 520  # type: ignore[attr-defined]


def test_saturation_turns_balance_into_affinity() -> None:
    # "w" holds 900 of the prompt's 1000 tokens and has 1.5 s of prefill queued; "c" holds nothing.
    prompt = list(range(1000, 1000 + 1000))
    cold = RoutingConfig(prefill_tps=1000, decode_weight=0, learn_prefill_tps=False)

    def pick(cfg: RoutingConfig, c_queue: int) -> str:
        idx = KvIndex("m")
        warm(idx, "w", prompt[:900])
        p = make_policy("kv-aware", seed=9, index=idx, cfg=cfg)
        return p.choose(ctx(prompt), [Cand("w", pending_prefill_tokens=1500), Cand("c",
                                                                                  pending_prefill_tokens=c_queue)]).backend.name

    # slack ("c" idle): recomputing the prefix on "c" is cheaper than waiting behind w's queue
    assert pick(cold, 0) == "c"
    # "c" has a short queue too: without the saturation term it still recomputes; with it, affinity wins
    assert pick(cold.model_copy(update={"saturation_weight": 0.0}), 100) == "c"
    assert pick(cold, 100) == "w"


def test_decode_side_and_kv_pressure_steer_away_from_a_packed_engine() -> None:
    p = make_policy("kv-aware", seed=10, index=KvIndex("m"), cfg=RoutingConfig(learn_prefill_tps=False))
    c = ctx(list(range(64)))
    c.max_tokens = 256
    packed, idle = Cand("packed", running=40), Cand("idle", running=2)
    assert p.choose(c, [packed, idle]).backend.name == "idle"
    d = p.choose(c, [packed, idle], explain=True)
    why = {e["backend"]: e for e in d.explain or []}
    assert why["packed"]["decode_s"] > why["idle"]["decode_s"] > 0  # type: ignore[operator]
    full, roomy = Cand("full", kv_usage=0.97), Cand("roomy", kv_usage=0.3)
    assert p.choose(c, [full, roomy]).backend.name == "roomy"
    off = make_policy("kv-aware", seed=10, index=KvIndex("m"), cfg=RoutingConfig(decode_weight=0))
    assert {off.choose(c, [Cand("packed", running=40), Cand("idle", running=2)]).backend.name
            for _ in range(40)} == {"packed", "idle"}  # the decode side off: a tie


def test_active_context_is_settled_and_decode_coefficients_are_fitted() -> None:
    p = make_policy("kv-aware", seed=11, index=KvIndex("m"))
    model, ledger = p.model, p.scorer.ledger  # type: ignore[attr-defined]
    a = Cand("a")
    c = ctx(list(range(1000)))
    c.max_tokens = 100
    d = p.choose(c, [a])
    p.on_routed(c, d)
    assert ledger.active["a"] == 1100
    p.on_finished(c, d, 0.0, 0)  # an attempt that produced nothing: settled, nothing learned
    assert ledger.active["a"] == 0 and "a" not in model.fits
    # TPOTs from an engine whose step is 20 ms + 4 ms per running request + 1 ms per 1000 context tokens
    rng = random.Random(0)
    for _ in range(200):
        running, active = rng.randrange(0, 30), rng.randrange(0, 50_000)
        model.observe_decode("a", running, active, 0.02 + 0.004 * (running + 1) + 1e-6 * active, 64)
    got_a, got_b = model.decode_coeffs("a")
    assert abs(got_a - 0.004) < 4e-4 and abs(got_b - 1e-6) < 1e-7, (got_a, got_b)
    assert model.decode_coeffs("b") == (model.decode_s_per_seq, model.decode_s_per_ctx_token)  # prior


def test_session_prior_keeps_a_session_before_events_and_load_can_move_it() -> None:
    now = [0.0]
    idx = KvIndex("m", clock=lambda: now[0])
    idx.block_size = BS  # known, but these engines publish no events: only the routing history is evidence
    cfg = RoutingConfig(decode_weight=0, learn_prefill_tps=False)
    p = make_policy("kv-aware", seed=12, index=idx, cfg=cfg)
    a, b = Cand("a"), Cand("b")
    turn1 = list(range(5000, 5000 + 40 * BS))
    first = p.choose(ctx(turn1, session="s"), [a, b])
    p.on_routed(ctx(turn1, session="s"), first)
    now[0] = 60.0  # the speculative "just routed here" entries have expired
    turn2 = [*turn1, *range(9000, 9000 + 4 * BS)]
    assert all(p.choose(ctx(turn2, session="s"), [a, b]).backend is first.backend for _ in range(20))
    other = make_policy("kv-aware", seed=12, index=idx, cfg=cfg.model_copy(update={"session_prior": False}))
    assert {other.choose(ctx(turn2, session="s"), [a, b]).backend.name for _ in range(40)} == {"a", "b"}
    pinned = a if first.backend is a else b
    pinned.pending_prefill_tokens = 100_000
    assert p.choose(ctx(turn2, session="s"), [a, b]).backend is not pinned  # the cost model moves it
    pinned.pending_prefill_tokens = 0
    # once the engine's events arrive, they are the evidence: it evicted the session's blocks
    idx.apply(first.backend.name, EventBatch(0.0, [BlockRemoved(block_hashes=[10**9])]))
    assert {p.choose(ctx(turn2, session="s"), [a, b]).backend.name for _ in range(40)} == {"a", "b"}


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


def test_new_sessions_spread_by_live_sessions_not_by_the_shared_system_prompt() -> None:
    idx = KvIndex("m")
    system = list(range(7000, 7000 + 4 * BS))
    warm(idx, "a", system)  # only "a" has served anyone yet: it holds the shared system prompt
    p = make_policy("kv-aware", seed=13, index=idx, cfg=RoutingConfig(decode_weight=0, learn_prefill_tps=False))
    a, b = Cand("a"), Cand("b")

    def turn(session: str, user: int) -> RequestContext:
        return ctx([*system, *range(user, user + 2 * BS)], session=session)

    for i in range(3):  # three sessions start on "a" (the requests finish: no queue is left behind)
        c = turn(f"s{i}", 10_000 * (i + 1))
        d = p.choose(c, [a, Cand("b-busy", pending_prefill_tokens=10**6)])
        assert d.backend is a
        p.on_routed(c, d)
    # a fourth session: "a" saves the system prompt, but "b" has three live sessions fewer
    assert p.choose(turn("s3", 90_000), [a, b]).backend is b
    off = make_policy("kv-aware", seed=13, index=idx, cfg=RoutingConfig(decode_weight=0, learn_prefill_tps=False,
                                                                        session_balance=0))
    assert off.choose(turn("s3", 90_000), [a, b]).backend is a
    # a session already live is not pushed away by the balance term (it only prices where sessions start)
    assert p.choose(turn("s0", 10_000), [a, b]).backend is a


def test_an_engine_not_measured_yet_is_priced_at_the_fleet_mean_not_the_prior() -> None:
    # The chat benchmark's hot spot: the first engines to serve learned ~6,500 tokens/s against the 4,000
    # prior, so the fleet's idle engines looked slower only because nobody had measured them.
    p = make_policy("kv-aware", index=KvIndex("m"), cfg=RoutingConfig(prefill_tps=4000))
    c = ctx(list(range(4000)))
    d = p.choose(c, [Cand("a")])
    for _ in range(30):
        p.on_first_token(c, d, 0.5, queued_tokens=0)  # "a": 8,000 tokens/s
    model = p.model  # type: ignore[attr-defined]
    assert model.tps("b") == model.tps("a") > 7500
    fresh = [p.choose(ctx(list(range(4000))), [Cand("a"), Cand("b")]).backend.name for _ in range(40)]
    assert set(fresh) == {"a", "b"}  # equal prices: no preference for the engine measured first


def test_session_balance_weighs_the_turns_a_session_brings() -> None:
    idx = KvIndex("m")
    system = list(range(7000, 7000 + 4 * BS))  # a shared system prompt, held by "a" only
    warm(idx, "a", system)
    cfg = RoutingConfig(decode_weight=0, learn_prefill_tps=False, session_turns=1)
    p = make_policy("kv-aware", seed=3, index=idx, cfg=cfg)
    a, b = Cand("a"), Cand("b")

    def turn(session: str, user: int) -> RequestContext:
        return ctx([*system, *range(user, user + BS)], session=session)

    c = turn("s0", 10_000)
    p.on_routed(c, p.choose(c, [a, Cand("b-busy", pending_prefill_tokens=10**6)]))
    # one-turn sessions: one live session on "a" weighs less than recomputing 4 blocks on "b"
    assert p.choose(turn("s1", 20_000), [a, b]).backend is a
    # a session that keeps talking brings its new work every turn: with 12 turns expected it starts on "b"
    many = make_policy("kv-aware", seed=3, index=idx, cfg=cfg.model_copy(update={"session_turns": 12}))
    many.on_routed(c, many.choose(c, [a, Cand("b-busy", pending_prefill_tokens=10**6)]))
    assert many.choose(turn("s1", 20_000), [a, b]).backend is b
    # and the turns are learned: s0 comes back eleven times, so the one-turn prior gives way
    for k in range(11):
        t = ctx([*system, *range(10_000, 10_000 + BS), *range(30_000 + k * BS, 30_000 + (k + 1) * BS)], "s0")
        p.on_routed(t, p.choose(t, [a]))
    assert p.scorer.ledger.expected_turns(1.0) > 2  # type: ignore[attr-defined]


def test_a_session_moving_off_its_engine_pays_for_the_live_sessions_it_joins() -> None:
    # Charging only new sessions is not enough: a start balanced onto the engine with the fewest live
    # sessions was moved off again at its next turn, and that engine, kept emptiest, drew every new session.
    ledger = Ledger()
    for i in range(3):
        ledger.pin(f"on-b{i}", "b", [i + 1], 0.0)
    ledger.pin("s", "a", [100], 0.0)  # s's first turn went to "a" (1 live session there, 3 on "b")
    live = [ledger.live["a"], ledger.live["b"], 0]
    names = ["a", "b", "c"]
    # a new session: live sessions above the least (0, on "c"), times the turns a session brings (prior 4,
    # pulled towards the 4 one-turn sessions seen)
    turns = ledger.expected_turns(4.0)
    assert turns == 3.0 and ledger.more_turns("new", live, names, 4.0) == [1 * turns, 3 * turns, 0.0]
    # s's next turn: nothing to stay; moving to "b" joins 3 live sessions where "a" keeps 0 without s,
    # times the turns s has left (3 expected, 1 seen)
    assert ledger.more_turns("s", live, names, 4.0) == [0.0, 3 * 2.0, 0.0]
