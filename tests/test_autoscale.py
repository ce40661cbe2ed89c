"""The autoscaler's decision core, its baselines' published behaviour, kvmesh's slo policy, cache-aware choices
and the simulator actuator.  Virtual time throughout: every clock is a number the test advances."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from kvmesh.autoscale.cacheaware import Hotness, prewarm_plan, ramp_share, victim_order
from kvmesh.autoscale.core import Behaviour, Capacity, Decision, Fleet, Policy, Scaler, ScalerConfig
from kvmesh.autoscale.policies import DynamoConfig, DynamoPolicy, HpaPolicy, KpaPolicy, QueuePolicy, make_policy
from kvmesh.autoscale.signals import AGGREGATED, EngineSignals, GatewaySignals, RoleSignals, Signals
from kvmesh.autoscale.slo import CapacityModel, MissFeedback, SloConfig, SloPolicy
from kvmesh.sim.cluster import Slo, make_requests
from kvmesh.sim.elastic import ElasticCluster, ElasticConfig, profiled_capacity
from kvmesh.sim.profiles import get_profile

CAP = Capacity(prefill_tps=10_000, decode_concurrency=100, tpot_s=0.05)


class FakeActuator:
    """Replicas become ready ``start_s`` after they are ordered (the test passes ``now`` along)."""

    def __init__(self, n: int, start_s: float = 0.0) -> None:
        self.ready_at: list[float] = [-math.inf] * n
        self.start_s, self.now = start_s, 0.0
        self.calls: list[tuple[float, int]] = []

    def replicas(self, role: str) -> int:
        return len(self.ready_at)

    def ready(self, role: str) -> int:
        return sum(t <= self.now for t in self.ready_at)

    def members(self, role: str) -> list[str]:
        return [f"e{i}" for i, t in enumerate(self.ready_at) if t <= self.now]

    def scale(self, role: str, n: int, victims: Sequence[str] = ()) -> None:
        self.calls.append((self.now, n))
        while len(self.ready_at) < n:
            self.ready_at.append(self.now + self.start_s)
        del self.ready_at[n:]


def sig(now: float, *, engines: int = 1, kv: float = 0.0, waiting: int = 0, running: int = 0,
        interval: float = 5.0, **gw: float) -> Signals:
    es = tuple(EngineSignals(f"e{i}", waiting // engines, running // engines, kv) for i in range(engines))
    return Signals(now, {AGGREGATED: RoleSignals(GatewaySignals(interval_s=interval, **gw), es)})  # type: ignore[arg-type]


def drive(scaler: Scaler, act: FakeActuator, t0: float, t1: float, step: float = 5.0, **kw: float) -> None:
    t = t0
    while t < t1:
        act.now = t
        scaler.tick(sig(t, engines=max(act.ready(AGGREGATED), 1), **kw))  # type: ignore[arg-type]
        t += step


# -- KPA --------------------------------------------------------------------------------------------------

def test_kpa_panic_at_most_doubles_per_decision() -> None:
    act = FakeActuator(2)
    scaler = Scaler(KpaPolicy(), act, ScalerConfig(1, 64))
    act.now = 0.0
    scaler.tick(sig(0.0, engines=2, kv=5.0))  # wants 20 replicas: 10x the ready count -> panic
    assert act.replicas(AGGREGATED) == 4 and "panic" in scaler.history[-1].reason
    act.now = 5.0
    scaler.tick(sig(5.0, engines=4, kv=5.0))
    assert act.replicas(AGGREGATED) == 8


def test_kpa_scales_down_only_after_the_300_s_delay() -> None:
    act = FakeActuator(4)
    scaler = Scaler(KpaPolicy(), act, ScalerConfig(1, 64))
    drive(scaler, act, 0, 100, kv=0.5)     # 4 x 0.5 / 0.5 = 4: at target
    assert act.replicas(AGGREGATED) == 4
    drive(scaler, act, 100, 800, kv=0.05)  # load gone at t=100
    assert act.replicas(AGGREGATED) < 4
    last_four = max(r.now for r in scaler.history if r.recommended >= 4)  # the stable average lags
    first_down = min(t for t, n in act.calls if n < 4)
    assert last_four + 300 <= first_down <= last_four + 305  # the 300 s delay, then at once


def test_kpa_tolerance_ignores_small_changes() -> None:
    act = FakeActuator(10)
    scaler = Scaler(KpaPolicy(), act, ScalerConfig(1, 64))
    drive(scaler, act, 0, 200, kv=0.54)  # 10.8 replicas' worth: within 10 % of 10
    assert act.calls == []


# -- HPA and KEDA queue -------------------------------------------------------------------------------------

def test_hpa_stabilises_scale_down_over_300_s() -> None:
    act = FakeActuator(1)
    scaler = Scaler(HpaPolicy(), act, ScalerConfig(1, 16))
    drive(scaler, act, 0, 15, kv=1.5)  # 3 replicas' worth at target 0.5
    assert act.replicas(AGGREGATED) == 3
    drive(scaler, act, 15, 300, kv=0.1)
    assert act.replicas(AGGREGATED) == 3
    drive(scaler, act, 300, 330, kv=0.1)
    assert act.replicas(AGGREGATED) == 1


def test_queue_scales_on_more_than_5_waiting_per_replica() -> None:
    act = FakeActuator(1)
    scaler = Scaler(QueuePolicy(), act, ScalerConfig(1, 16))
    act.now = 0.0
    scaler.tick(sig(0.0, waiting=5))  # exactly at the threshold: stays
    assert act.calls == []
    act.now = 30.0
    scaler.tick(sig(30.0, waiting=12))
    assert act.replicas(AGGREGATED) == 3  # ceil(12 / 5)
    drive(scaler, act, 60, 390, waiting=0)
    assert act.replicas(AGGREGATED) == 3  # 360 s cooldown
    drive(scaler, act, 390, 430, waiting=0)
    assert act.replicas(AGGREGATED) == 1


# -- Dynamo ---------------------------------------------------------------------------------------------

def test_dynamo_formula_every_180_s() -> None:
    act = FakeActuator(1)
    pol = DynamoPolicy(DynamoConfig(CAP))
    scaler = Scaler(pol, act, ScalerConfig(1, 64))
    act.now = 0.0
    scaler.tick(sig(0.0, interval=0.0))  # first decision at t=0 (nothing observed yet: unchanged)
    # 180 s: 36 requests/5 s, 1,000 prompt tokens each -> 7,200 prompt tokens/s; 100 output tokens each
    drive(scaler, act, 5, 180, arrivals=36, prompt_tokens=36_000, output_tokens=3_600, finished=36)
    assert act.replicas(AGGREGATED) == 1  # not yet due
    drive(scaler, act, 180, 185, arrivals=36, prompt_tokens=36_000, output_tokens=3_600, finished=36)
    prefill = 7_200 / CAP.prefill_tps             # 0.72
    decode = 7.2 * 100 / CAP.decode_tps           # 720 tokens/s / 2,000 = 0.36
    assert act.replicas(AGGREGATED) == math.ceil(prefill + decode) == 2
    assert scaler.history[-1].inputs["both.prefill_load"] == pytest.approx(prefill)


# -- slo ------------------------------------------------------------------------------------------------

def test_slo_scales_out_before_the_breach_on_a_ramp() -> None:
    act = FakeActuator(1, start_s=60.0)
    pol = SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False))
    scaler = Scaler(pol, act, ScalerConfig(1, 64, start_s=60.0))
    t, ordered_at = 0.0, None
    while t < 600:
        tps = 20.0 * t  # prompt tokens/s rising 20/s each second; 1 replica saturates at 10,000 (t = 500)
        act.now = t
        scaler.tick(sig(t, engines=act.ready(AGGREGATED), prompt_tokens=int(tps * 5), arrivals=1))
        if ordered_at is None and act.replicas(AGGREGATED) > 1:
            ordered_at = t
        t += 5.0
    assert ordered_at is not None and ordered_at + 60.0 < 500  # serving before one replica saturates
    assert all(r.reason.startswith("both: load") for r in scaler.history)  # from the forecast, not a breach


def test_slo_panics_on_a_predicted_breach_not_on_a_long_prompt() -> None:
    pol = SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False))
    act = FakeActuator(2, start_s=60.0)
    scaler = Scaler(pol, act, ScalerConfig(1, 64, start_s=60.0))
    # one 30k-token prompt per 5 s: TTFT p90 3 s (> 2 s) on an otherwise idle fleet, nothing queued behind it
    drive(scaler, act, 0, 120, prompt_tokens=30_000, arrivals=1, ttft_p90_s=3.0)
    assert act.replicas(AGGREGATED) == 2  # 6,000 tokens/s / 10,000 / 0.85 -> 1; hysteresis keeps 2
    # 50,000 prompt tokens queued on 2 ready replicas: 2.5 s of backlog > the 2 s TTFT target
    drive(scaler, act, 120, 125, prompt_tokens=30_000, arrivals=1, queued_prefill_tokens=50_000)
    assert act.replicas(AGGREGATED) == 3 and "predicted TTFT breach" in scaler.history[-1].reason


def test_slo_scales_in_only_below_n_minus_1_with_headroom() -> None:
    pol = SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False))
    act = FakeActuator(3, start_s=60.0)
    scaler = Scaler(pol, act, ScalerConfig(1, 64, start_s=60.0))
    # 1.6 replicas of load: 2 carry it at the 0.85 scale-out share (80 %) but not at the 0.75 scale-in share
    drive(scaler, act, 0, 400, prompt_tokens=5 * 16_000)
    assert act.replicas(AGGREGATED) == 3
    drive(scaler, act, 400, 700, prompt_tokens=5 * 12_000)  # 1.2 / 0.75 -> 2, after the window
    ups = [t for t, n in act.calls if n == 2]
    assert act.replicas(AGGREGATED) == 2 and ups and ups[0] >= 400 + 120


def test_cold_start_replicas_count_so_no_reorder() -> None:
    act = FakeActuator(1, start_s=60.0)
    pol = SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False))
    scaler = Scaler(pol, act, ScalerConfig(1, 64, start_s=60.0))
    drive(scaler, act, 0, 55, prompt_tokens=5 * 20_000)  # 2 replicas' load / 0.75 -> 3
    assert act.replicas(AGGREGATED) == 3 and act.ready(AGGREGATED) == 1
    assert len(act.calls) == 1  # ordered once; not again on every tick of the cold start


def test_scaler_clamps_and_cancels_starting_first() -> None:
    class Fixed(Policy):
        name = "fixed"
        period_s = 0.0
        behaviour = Behaviour()

        def __init__(self) -> None:
            self.n = 100

        def decide(self, now: float, signals: Signals, current: dict[str, Fleet]) -> Decision:  # type: ignore[override]
            return Decision({AGGREGATED: self.n}, "fixed")

    act, pol = FakeActuator(1, start_s=60.0), Fixed()
    scaler = Scaler(pol, act, ScalerConfig(1, 4))
    scaler.tick(sig(0.0))
    assert act.replicas(AGGREGATED) == 4
    pol.n = 0
    chosen: list[int] = []
    scaler.victims = lambda role, members, k: chosen.append(k) or members[:k]  # type: ignore[assignment,func-returns-value]
    scaler.tick(sig(1.0))
    assert act.replicas(AGGREGATED) == 1 and chosen == []  # the 3 starting ones went; no victim needed


def test_make_policy_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown autoscaling policy"):
        make_policy("nope", CAP)


# -- cache-aware ------------------------------------------------------------------------------------------

def test_victim_is_the_replica_with_fewest_unique_hot_blocks() -> None:
    blocks = {"a": {1, 2, 3}, "b": {1, 4}, "c": {5, 6, 7, 8}}
    hot = {1: 10.0, 2: 5.0, 3: 5.0, 4: 1.0, 5: 0.1, 6: 0.1, 7: 0.1, 8: 0.1}
    # unique value: a = 10 (2, 3), b = 1 (4; block 1 is also on a), c = 0.4
    assert victim_order(blocks, hot, ["a", "b", "c"]) == ["c", "b", "a"]


def test_prewarm_plan_loads_whole_chains_parents_first() -> None:
    h = Hotness(half_life_s=100.0)
    for _ in range(3):
        h.touch([1, 2, 3], 0.0)
    h.touch([1, 9], 0.0)
    plan = prewarm_plan(h.snapshot(0.0), h.parent, budget_blocks=4)
    assert plan[:3] == [1, 2, 3] and plan == [1, 2, 3, 9]
    assert prewarm_plan(h.snapshot(0.0), h.parent, budget_blocks=2) == [1, 2]  # hottest first, within budget
    assert prewarm_plan(h.snapshot(0.0), h.parent, 2, held={1, 2}) == [3, 9]  # held blocks cost nothing
    assert ramp_share(0, 60) == 0 and ramp_share(30, 60) == 0.5 and ramp_share(90, 60) == 1.0


# -- the simulator actuator -------------------------------------------------------------------------------

def _requests(n: int, gap: float) -> list:  # type: ignore[type-arg]
    prompts = [[(i * 7 + j) % 1000 for j in range(64)] for i in range(n)]
    return make_requests(prompts, [i * gap for i in range(n)], [200] * n, 16, 0)


def test_sim_actuator_respects_cold_start_and_drains_without_dropping() -> None:
    cfg = ElasticConfig(max_replicas=3, initial=2, start_s=60.0, interval_s=5.0)
    cl = ElasticCluster(cfg, get_profile("h100-llama3-8b"), "round-robin", 16, slo=Slo(2.0, 0.05))

    class Script(Policy):
        name = "script"
        period_s = 0.0

        def decide(self, now: float, signals: Signals, current: dict[str, Fleet]) -> Decision:  # type: ignore[override]
            n = 3 if now < 100 else 1  # out at 5 s (serves from 65 s), in at 100 s
            return Decision({AGGREGATED: n}, "script")

    cl.attach(Scaler(Script(), cl, ScalerConfig(1, 3, start_s=60.0)))
    reqs = _requests(800, 0.25)
    res = cl.simulate(reqs)
    assert res.requests == 800 and res.unfinished == 0  # nothing dropped by the drains
    assert all(r.done_at > 0 for r in reqs)
    ready = {t: r for t, _, r, _ in cl.timeline}
    assert all(r == 2 for t, r in ready.items() if t < 65) and all(r == 3 for t, r in ready.items() if 65 <= t < 100)
    assert min(r.arrival for r in reqs if r.engine == "e2") >= 65  # cold start respected
    late = [r for r in reqs if r.arrival > 100]
    assert late and len({r.engine for r in late}) == 1  # drained replicas take no new request


def test_slo_miss_feedback_raises_a_floor_until_misses_fall_and_backs_off_a_futile_one() -> None:
    fb = MissFeedback(budget=0.01, window_s=120.0, start_s=60.0, decay_s=600.0)

    def run(t0: float, t1: float, missed: int, replicas: int) -> int:
        t, floor = t0, fb.floor
        while t < t1:
            fb.observe(t, 20, missed)
            floor = fb.update(t, replicas)
            t += 5.0
        return floor

    assert run(0, 115, 4, 1) == 0          # a window not yet full: no judgement
    assert run(115, 125, 4, 1) == 2        # 20 % of TPOT misses over the 1 % budget: one more than exists
    assert run(125, 305, 1, 2) == 2        # judged only a cold start + a window after the scale-up (125 s)
    assert run(305, 310, 1, 2) == 3        # 5 % (was 20 %): the raise helped, and misses still over budget
    assert run(310, 490, 1, 3) == 3
    assert run(490, 605, 1, 3) == 3        # still 5 %: the third replica looks futile; one window proves little
    assert run(605, 615, 1, 3) == 2        # a second window alike: it is given back ...
    assert run(615, 800, 1, 2) == 2        # ... and not ordered again while the cap holds
    # the share is judged over everything since the change: the early misses weigh until enough clean requests
    # dilute them under half the budget (~1,920 s), and decay_s has passed
    assert run(800, 1800, 0, 2) == 2
    assert run(1800, 2100, 0, 2) == 1


def test_slo_learns_the_kv_bound_on_streams_per_replica() -> None:
    model = CapacityModel(CAP)  # the prior: 100 streams per replica
    for _ in range(20):  # 60 streams per replica fill 80 % of the cache: 0.9 * 60 / 0.8 = 67.5 fit
        model.learn(RoleSignals(GatewaySignals(interval_s=5.0),
                                tuple(EngineSignals(f"e{i}", 0, 60, 0.8) for i in range(2))), 2)
    assert model.decode_concurrency(0.05) == pytest.approx(67.5)


def test_profiled_capacity_is_bounded_by_the_kv_cache() -> None:
    p = get_profile("h100-llama3-8b")  # 480k KV tokens
    cap = profiled_capacity(p, 0.05, 9_000.0)
    assert cap.decode_concurrency == pytest.approx(0.9 * 480_000 / 9_000)  # 48 fit; TPOT alone would allow ~90


def test_slo_does_not_scale_in_while_warming_up() -> None:
    act = FakeActuator(3, start_s=60.0)
    scaler = Scaler(SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False)), act, ScalerConfig(1, 64, start_s=60.0))
    drive(scaler, act, 0, 120, prompt_tokens=5 * 1_000)  # 0.1 replicas of load from the first tick
    assert act.replicas(AGGREGATED) == 3 and "warming up" in scaler.history[-1].reason
    drive(scaler, act, 120, 250, prompt_tokens=5 * 1_000)
    assert act.replicas(AGGREGATED) < 3


def test_autoscale_set_parses_settings_and_rejects_unknown_ones() -> None:
    from kvmesh.autoscale.local import LocalConfig, parse_tuning, tuned_policy

    tuning = parse_tuning(["scale_down_window_s=300", "utilisation = 0.7"])
    assert tuning == {"scale_down_window_s": 300.0, "utilisation": 0.7}
    pol = tuned_policy(LocalConfig("slo", tuning=tuning))
    assert isinstance(pol, SloPolicy) and pol.cfg.scale_down_window_s == 300.0 and pol.cfg.utilisation == 0.7
    for bad in ("scale_down_window_s", "=3", "utilisation=high"):
        with pytest.raises(ValueError, match="NAME=NUMBER"):
            parse_tuning([bad])
    with pytest.raises(ValueError, match="no setting"):
        tuned_policy(LocalConfig("slo", tuning={"panic_window_s": 10.0}))


def test_slo_judges_scale_in_at_the_smaller_fleets_slower_tpot() -> None:
    model = CapacityModel(CAP)
    for s in (20, 40, 60, 80) * 5:  # TPOT = 10 ms + 0.3 ms per stream on a replica
        model.learn(RoleSignals(GatewaySignals(interval_s=5.0, tpot_p50_s=0.01 + 0.0003 * s),
                                tuple(EngineSignals(f"e{i}", 0, s) for i in range(4))), 4)
    a, b = model.tpot_line() or (0.0, 0.0)
    assert a == pytest.approx(0.01) and b == pytest.approx(0.0003)
    # 4,000 tokens/s: 1 / (1 - 4,000 x 0.0003 / n) x 10 ms per token on n replicas
    assert model.per_token_at(5, 4, 4000.0, 0.0143, 0.05) == 0.0143  # a larger fleet: the observed figure
    assert model.per_token_at(3, 4, 4000.0, 0.0143, 0.05) == pytest.approx(0.01 / 0.6)
    assert model.per_token_at(2, 4, 4000.0, 0.0143, 0.05) == pytest.approx(0.025)
    assert model.per_token_at(1, 4, 4000.0, 0.0143, 0.05) == 0.05  # beyond 1 replica's reach: the target
    assert CapacityModel(CAP).per_token_at(3, 4, 4000.0, 0.0143, 0.05) == 0.05  # no line: the target
    # the policy: 10 requests/s of 500 tokens at 25 ms per token hold 125 streams — 1.25 replicas of 100 at
    # the observed TPOT (2 carry it at 75 %), but 2.5 at the 50 ms a slower fleet may take: 3 stay
    act = FakeActuator(3, start_s=60.0)
    scaler = Scaler(SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False)), act, ScalerConfig(1, 64, start_s=60.0))
    drive(scaler, act, 0, 600, arrivals=50, finished=50, output_tokens=50 * 500, tpot_p50_s=0.025)
    assert act.replicas(AGGREGATED) == 3 and "on 3" in scaler.history[-1].reason


@pytest.mark.parametrize("follows", [True, False])
def test_slo_miss_floor_follows_the_load_down(follows: bool) -> None:
    pol = SloPolicy(SloConfig(prior=CAP, start_s=60.0, learn=False, floor_follows_load=follows))
    act = FakeActuator(3, start_s=60.0)
    scaler = Scaler(pol, act, ScalerConfig(1, 64, start_s=60.0))
    # 2.2 replicas of prefill (3 at 85 %), and 20 % of the answers over the TPOT target at first: a floor of 4,
    # one over the rate model's 3
    drive(scaler, act, 0, 300, arrivals=20, prompt_tokens=110_000, finished=20, slo_missed_tpot=4)
    drive(scaler, act, 300, 1000, arrivals=20, prompt_tokens=110_000, finished=20, slo_missed_tpot=0)
    assert act.replicas(AGGREGATED) == 4 and "floor 4" in scaler.history[-1].reason
    # the load falls to 0.5 replicas (the rate model alone asks for 1): the floor stays one over that, where a
    # fixed floor holds 4 until it decays
    drive(scaler, act, 1000, 1400, arrivals=20, prompt_tokens=25_000, finished=20, slo_missed_tpot=0)
    assert act.replicas(AGGREGATED) == (2 if follows else 4)
