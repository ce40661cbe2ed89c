"""Routing policies on plain candidates (no I/O): exact picks, tie-breaks, filters."""

from __future__ import annotations

import collections

import pytest

from kvmesh.routing import CandidateState, NoCandidate, RequestContext, make_policy


def Cand(name: str, healthy: bool = True, in_flight: int = 0,
         models: frozenset[str] = frozenset({"m"})) -> CandidateState:
    return CandidateState(name, healthy, in_flight, models)


def ctx(model: str = "m") -> RequestContext:
    return RequestContext(request_id="r", model=model, endpoint="completions")


def test_round_robin_cycles_in_name_order_and_skips_unhealthy() -> None:
    p = make_policy("round-robin")
    cands = [Cand("b"), Cand("a"), Cand("c")]
    assert [p.choose(ctx(), cands).backend.name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    cands[0].healthy = False
    picks = [p.choose(ctx(), cands).backend.name for _ in range(4)]
    assert "b" not in picks and collections.Counter(picks) == {"a": 2, "c": 2}


def test_least_request_picks_min_in_flight_and_breaks_ties_randomly() -> None:
    p = make_policy("least-request", seed=1)
    cands = [Cand("a", in_flight=3), Cand("b", in_flight=1), Cand("c", in_flight=2)]
    d = p.choose(ctx(), cands)
    assert d.backend.name == "b" and d.costs == {"in_flight": 1.0}
    tie = [Cand("a"), Cand("b")]
    assert {p.choose(ctx(), tie).backend.name for _ in range(50)} == {"a", "b"}


def test_random_is_seedable_and_uses_all() -> None:
    picks = [make_policy("random", seed=7).choose(ctx(), [Cand("a"), Cand("b"), Cand("c")]).backend.name
             for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same first pick
    p = make_policy("random", seed=3)
    assert {p.choose(ctx(), [Cand("a"), Cand("b"), Cand("c")]).backend.name for _ in range(60)} == {"a", "b", "c"}


def test_model_filter_and_unknown_models() -> None:
    p = make_policy("round-robin")
    cands = [Cand("a", models=frozenset({"x"})), Cand("b", models=frozenset())]
    # "b" has not reported its models yet: kept; "a" serves another model: filtered out
    assert p.choose(ctx("m"), cands).backend.name == "b"
    with pytest.raises(NoCandidate):
        p.choose(ctx("m"), [Cand("a", models=frozenset({"x"}))])


def test_exclude_and_empty() -> None:
    p = make_policy("least-request")
    assert p.choose(ctx(), [Cand("a"), Cand("b")], exclude=frozenset({"a"})).backend.name == "b"
    with pytest.raises(NoCandidate):
        p.choose(ctx(), [Cand("a", healthy=False)])
    with pytest.raises(ValueError, match=r"unknown policy .nope.; choose one of: random, "):
        make_policy("nope")


def test_engine_metrics_parsing_uses_vllm_names() -> None:
    from kvmesh.gateway.backends import parse_engine_metrics

    text = (b'# HELP vllm:num_requests_running Running\n'
            b'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            b'vllm:num_requests_running{engine="1",model_name="m"} 2.0\n'
            b'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
            b'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
            b'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75\n'
            b'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 9.0\n')
    assert parse_engine_metrics(text) == (5, 4, 0.75)
    assert parse_engine_metrics(b"") == (0, 0, -1.0)


def test_sim_engine_metrics_match_vllm_names() -> None:
    from prometheus_client import generate_latest

    from kvmesh.gateway.backends import parse_engine_metrics
    from kvmesh.sim.server import SimMetrics

    m = SimMetrics("m")
    m.running.labels(*m.labels).set(2)
    m.waiting.labels(*m.labels).set(1)
    m.usage.labels(*m.labels).set(0.5)
    assert parse_engine_metrics(generate_latest(m.registry)) == (2, 1, 0.5)
