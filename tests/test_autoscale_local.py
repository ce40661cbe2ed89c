"""``kvmesh up --autoscale`` on simulated engines: scale out (start, pre-warm, ramp in) and back in (cache-aware
victim, drain, stop) under a step load, with no failed request and no stream cut; scale from zero.

The tests call the control tick themselves (no timer), so what happens depends on events, not on how fast
the machine runs.  The first scripts the step as a replica count (a test policy); the second runs the real
``queue`` policy (KEDA on ``vllm:num_requests_waiting``, its windows shortened through
``LocalConfig.tuning``) and makes the waiting count real with a :class:`Gate` on the engines' schedulers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import pathlib
import re
import threading
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from kvmesh.autoscale.core import Decision, Fleet, Policy
from kvmesh.autoscale.local import LocalConfig, slo_targets
from kvmesh.autoscale.policies import make_policy
from kvmesh.autoscale.signals import AGGREGATED, Signals
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, engine_config
from kvmesh.engines.base import EngineState
from kvmesh.engines.sim import SimEngine
from kvmesh.index.hashing import block_keys
from kvmesh.sim.core import StepResult
from kvmesh.stack import DEMO_MODEL_NAME, Stack
from tests.helpers import LoopThread, free_port_block, wait_until

HOT = [11 + (i % 200) for i in range(96)]  # a 96-token prefix (6 blocks of 16) many requests share


class StepPolicy(Policy):
    """The load step as the test scripts it: ``level`` replicas wanted."""

    name = "step"
    period_s = 0.0

    def __init__(self) -> None:
        self.level = 1

    def decide(self, now: float, signals: Signals, current: Mapping[str, Fleet]) -> Decision:
        g = signals.role(AGGREGATED).gateway
        return Decision({AGGREGATED: self.level}, f"scripted step to {self.level}",
                        {"in_flight": float(g.in_flight), "arrivals": float(g.arrivals)})


def make_stack(tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread, auto: LocalConfig,
               **gateway: Any) -> Stack:
    cfg = StackConfig(model_size="tiny", models_dir=str(tiny_model.parent),
                      engine=engine_config(kind="sim", model=str(tiny_model), served_model_name=DEMO_MODEL_NAME),
                      supervisor=SupervisorConfig(replicas=1, base_port=free_port_block(auto.max_replicas),
                                                  run_dir=str(tmp_path)),
                      gateway=GatewayConfig(port=0, policy="kv-aware", health_interval_s=0.2, **gateway),
                      cache=CacheNodeConfig(enabled=False))
    st = loop_thread.call(lambda: Stack(cfg, autoscale=auto))
    loop_thread.run(st.start(wait=True))
    assert st.autoscaler is not None
    return st


@pytest.fixture
def auto_stack(tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread) -> Iterator[Stack]:
    auto = LocalConfig(policy="hpa", min_replicas=1, max_replicas=3, interval_s=3600, ramp_s=0)
    st = make_stack(tmp_path, tiny_model, loop_thread, auto)
    assert st.autoscaler is not None
    st.autoscaler.scaler.policy = StepPolicy()
    yield st
    loop_thread.run(st.stop())


class Gate:
    """Holds a simulated engine's scheduler while its HTTP server and ``/metrics`` keep answering (as vLLM's
    API server does while its engine core is stopped).  ``closed``: no step runs, new requests wait;
    ``prefill``: steps run only while a request waits or prefills (streams get their first token, then
    hold); ``open``: every step runs."""

    def __init__(self, engine: object) -> None:
        assert isinstance(engine, SimEngine) and engine.server is not None
        self.core = engine.server.core
        self._step, self.mode = self.core.step, "open"
        self.core.step = self.step  # type: ignore[method-assign]

    def step(self, now: float, horizon: float = math.inf) -> StepResult:
        c = self.core
        if self.mode == "open" or (self.mode == "prefill" and (c.waiting or any(r.prefilling for r in c.running))):
            return self._step(now, horizon)
        return StepResult(0.02, [], [])  # the engine loop asks again in 20 ms


def complete(url: str, prompt: object, max_tokens: int = 4) -> tuple[int, str]:
    r = httpx.post(f"{url}/v1/completions", json={"model": DEMO_MODEL_NAME, "prompt": prompt,
                                                  "max_tokens": max_tokens}, timeout=60)
    return r.status_code, r.headers.get("x-kvmesh-backend", "")


def stream(url: str, prompt: object) -> list[str]:
    body = {"model": DEMO_MODEL_NAME, "prompt": prompt, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        return [x for x in r.iter_lines() if x.startswith("data: ")]


def cache_hits(engine_url: str) -> float:
    m = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", httpx.get(f"{engine_url}/metrics").text,
                  re.M)
    return float(m.group(1)) if m else 0.0


def hear_engine0(st: Stack) -> None:
    """Send fresh prompts until one of engine-0's KV events has told the router the block size.

    The router keys prompts only then, and a simulated engine's events published before the gateway's
    subscription connected are lost: until one arrives no prompt is keyed, so nothing can be pre-warmed."""
    probes = iter(range(100))

    def heard() -> bool:  # each probe a fresh prompt: a cached one stores no block, so publishes nothing
        n = next(probes)
        assert complete(st.gateway.url, [3000 + 64 * n + j for j in range(64)])[0] == 200
        return st.gateway.policy.key_spec(None) is not None

    wait_until(heard, 60, "engine-0's KV events")


def test_scales_out_prewarmed_and_back_in_without_failing_a_request(auto_stack: Stack,
                                                                    loop_thread: LoopThread) -> None:
    st = auto_stack
    auto, url = st.autoscaler, st.gateway.url
    assert auto is not None
    policy = auto.scaler.policy
    assert isinstance(policy, StepPolicy)
    hear_engine0(st)
    for i in range(4):  # the hot prefix, served by engine-0
        assert complete(url, [*HOT, 500 + i]) == (200, "engine-0")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # step up: 2 replicas wanted
        policy.level = 2
        loop_thread.call(auto.tick)
        wait_until(lambda: "engine-1" in auto.actuator.serving, 120, "engine-1 serving")
        new = next(e for e in st.supervisor.engines if e.name == "engine-1")
        served = [ev for ev in auto.actuator.events if ev["event"] == "serving" and ev["replica"] == "engine-1"]
        assert served and served[0]["prewarmed_prompts"] >= 1
        hits = cache_hits(new.url)
        assert complete(new.url, [*HOT, 999], max_tokens=1)[0] == 200  # the hot prefix, straight to engine-1
        assert cache_hits(new.url) >= hits + len(HOT) - 16  # found in its prefix cache: pre-warmed
        # load on both replicas while the step goes down: streams in flight on the victim must finish
        streams = [pool.submit(stream, url, [*HOT, 700 + i]) for i in range(6)]
        wait_until(lambda: st.gateway.path.active > 0, 60, "streams in flight")
        policy.level = 1
        loop_thread.call(auto.tick)
        more = [pool.submit(complete, url, [*HOT, 800 + i]) for i in range(6)]
        wait_until(lambda: len(auto.actuator.serving) == 1 and not auto.actuator.draining, 120, "scale-in done")
        outs = [f.result() for f in streams]
        codes = [f.result()[0] for f in more]
    assert all(lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines) for lines in outs)  # none cut
    assert codes == [200] * 6
    stopped = [ev for ev in auto.actuator.events if ev["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["cut"] == 0
    assert [b.name for b in st.gateway.pool.backends] == list(auto.actuator.serving)
    assert len(st.supervisor.engines) == 1
    # the replica is gone for good: no metric series keeps its name (one per replica ever started would grow)
    metrics = httpx.get(f"{url}/metrics").text
    assert f'backend="{stopped[0]["replica"]}"' not in metrics
    assert all(f'backend="{b}"' in metrics for b in auto.actuator.serving)
    dbg = httpx.get(f"{url}/debug/autoscale").json()
    assert dbg["enabled"] and dbg["policy"] == "step" and dbg["scale_events"] == {"up": 1, "down": 1}
    assert [d["desired"] for d in dbg["decisions"]] == [2, 1]
    assert dbg["decisions"][0]["reason"] == "scripted step to 2" and "in_flight" in dbg["decisions"][0]["inputs"]
    assert "queued_prefill_tokens" in dbg["pressure"]


@pytest.fixture
def queue_stack(tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread) -> Iterator[Stack]:
    # the real queue policy (KEDA: waiting per replica over a target), deciding at every tick, no cooldown
    auto = LocalConfig(policy="queue", min_replicas=1, max_replicas=2, interval_s=3600, ramp_s=0,
                       tuning={"target": 1.0, "period_s": 0.0, "scale_down_window_s": 0.0})
    st = make_stack(tmp_path, tiny_model, loop_thread, auto)
    yield st
    loop_thread.run(st.stop())


def engine(st: Stack, name: str) -> Any:
    return next(e for e in st.supervisor.engines if e.name == name)


def scraped(st: Stack, name: str, waiting: int, running: int) -> bool:
    """The gateway's latest scrape of ``name``'s /metrics shows these counts."""
    b = st.gateway.pool.get(name)
    return b is not None and b.running == running and b.engine_queue == running + waiting


def test_queue_policy_scales_out_on_waiting_requests_and_in_when_they_are_gone(queue_stack: Stack,
                                                                               loop_thread: LoopThread) -> None:
    st = queue_stack
    auto, url = st.autoscaler, st.gateway.url
    assert auto is not None and auto.scaler.policy.name == "queue"
    for i in range(4):  # the hot prefix, served by engine-0
        assert complete(url, [*HOT, 500 + i]) == (200, "engine-0")
    # these prompts may have gone before any KV event told the router the block size (on a loaded machine
    # the subscription can connect late): they wait unkeyed and are keyed at the pre-warm, once it is known
    hear_engine0(st)
    gate0 = loop_thread.call(lambda: Gate(engine(st, "engine-0")))
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        gate0.mode = "closed"  # engine-0 stops scheduling: 4 requests wait there
        held = [pool.submit(stream, url, [*HOT, 600 + i]) for i in range(4)]
        wait_until(lambda: scraped(st, "engine-0", waiting=4, running=0), 60, "4 waiting on engine-0")
        loop_thread.call(auto.tick)  # 4 waiting / target 1 -> 4, within max 2
        wait_until(lambda: "engine-1" in auto.actuator.serving, 120, "engine-1 serving")
        assert auto.scaler.history[-1].desired == 2 and "waiting" in auto.scaler.history[-1].reason
        served = [ev for ev in auto.actuator.events if ev["event"] == "serving"]
        assert served[0]["replica"] == "engine-1" and served[0]["prewarmed_prompts"] >= 1, auto.actuator.events
        hits = cache_hits(engine(st, "engine-1").url)
        # the hot prefix through the gateway: engine-1 takes it (engine-0 is queued) and finds it pre-warmed
        assert complete(url, [*HOT, 999]) == (200, "engine-1")
        assert cache_hits(engine(st, "engine-1").url) >= hits + len(HOT) - 16
        gate0.mode = "open"
        outs = [f.result() for f in held]
        # load stops with streams in flight on both replicas (first token out, then held): 0 waiting
        gate1 = loop_thread.call(lambda: Gate(engine(st, "engine-1")))
        gate0.mode = gate1.mode = "prefill"
        streams = [pool.submit(stream, url, [7 + i, *range(100 + 40 * i, 140 + 40 * i)]) for i in range(6)]
        wait_until(lambda: len(gate0.core.running) + len(gate1.core.running) == 6, 60, "6 streams running")
        wait_until(lambda: all(scraped(st, n, waiting=0, running=len(g.core.running))
                               for n, g in (("engine-0", gate0), ("engine-1", gate1))), 60, "scraped: 0 waiting")
        loop_thread.call(auto.tick)  # 0 waiting -> min 1: the cache-aware victim drains
        wait_until(lambda: any(ev["event"] == "draining" for ev in auto.actuator.events), 30, "a drain")
        draining = [ev for ev in auto.actuator.events if ev["event"] == "draining"]
        more = [pool.submit(complete, url, [*HOT, 800 + i]) for i in range(4)]
        gate0.mode = gate1.mode = "open"
        wait_until(lambda: len(auto.actuator.serving) == 1 and not auto.actuator.draining, 120, "scale-in done")
        outs += [f.result() for f in streams]
        codes = [f.result()[0] for f in more]
    assert draining[0]["in_flight"] >= 1  # the victim had streams in flight when it began to drain
    assert all(lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines) for lines in outs)  # none cut
    assert codes == [200] * 4
    stopped = [ev for ev in auto.actuator.events if ev["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["cut"] == 0
    assert len(st.supervisor.engines) == 1 and auto.scaler.scale_events == {"up": 1, "down": 1}


@pytest.fixture
def zero_stack(tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread) -> Iterator[Stack]:
    auto = LocalConfig(policy="queue", min_replicas=0, max_replicas=1, interval_s=3600, ramp_s=0)
    st = make_stack(tmp_path, tiny_model, loop_thread, auto, cold_start_hold_s=120.0)
    yield st
    loop_thread.run(st.stop())


def gate_start(e: Any, release: threading.Event) -> None:
    """``e``'s next start (its model load) ends only once ``release`` is set."""
    start = e.start

    async def gated_start() -> None:
        await asyncio.to_thread(release.wait, 120)
        await start()

    e.start = gated_start


def gate_starts(auto: Any, release: threading.Event | None) -> list[Any]:
    """Every new replica's start waits for ``release`` (None: no wait); returns the replicas made."""
    make, made = auto.actuator.factory, []

    def slow_factory(i: int) -> Any:
        e, kv = make(i)
        if release is not None:
            gate_start(e, release)
        made.append(e)
        return e, kv

    auto.actuator.factory = slow_factory
    return made


def test_scale_from_zero_holds_the_request_until_the_first_replica_is_ready(zero_stack: Stack,
                                                                           loop_thread: LoopThread) -> None:
    st = zero_stack
    auto = st.autoscaler
    assert auto is not None and st.supervisor.engines == [] and st.gateway.pool.backends == []
    release = threading.Event()  # the first replica's start (its model load) ends when the test says
    gate_starts(auto, release)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(complete, st.gateway.url, [*HOT, 1])
        wait_until(lambda: st.gateway.admission.holding == 1 and "engine-0" in auto.actuator.starting, 60,
                   "the request held while engine-0 starts")
        assert not fut.done()
        release.set()
        assert fut.result() == (200, "engine-0")
    assert [ev["event"] for ev in auto.actuator.events] == ["starting", "serving"]
    assert st.gateway.admission.holding == 0 and st.gateway.pressure.shed["cold_start"] == 0


@pytest.mark.parametrize(("policy", "tuning"), [("kpa", {"tick_s": 0.0, "scale_down_delay_s": 0.0}),
                                                ("hpa", {"period_s": 0.0, "scale_down_window_s": 0.0}),
                                                ("queue", {"period_s": 0.0, "scale_down_window_s": 0.0})])
def test_scale_from_zero_survives_the_decisions_made_during_the_cold_start(
        tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread, policy: str,
        tuning: dict[str, float]) -> None:
    # every tick decides and no window holds a scale-down back: with no replica ready the policy sees no
    # load and recommends 0, which cancelled the woken replica (held requests: 503, the next woke it again)
    cfg = LocalConfig(policy=policy, min_replicas=0, max_replicas=1, interval_s=3600, ramp_s=0, tuning=tuning)
    st = make_stack(tmp_path, tiny_model, loop_thread, cfg, cold_start_hold_s=120.0)
    auto, release = st.autoscaler, threading.Event()
    assert auto is not None
    gate_starts(auto, release)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(complete, st.gateway.url, [*HOT, 1])
            try:
                wait_until(lambda: st.gateway.admission.holding == 1 and "engine-0" in auto.actuator.starting,
                           60, "the request held while engine-0 starts")
                for _ in range(3):  # the control ticks of the cold start
                    loop_thread.call(auto.tick)
                    assert "engine-0" in auto.actuator.starting, auto.actuator.events
            finally:
                release.set()
            assert fut.result() == (200, "engine-0")
        assert [ev["event"] for ev in auto.actuator.events] == ["starting", "serving"]
        assert st.gateway.pressure.shed["cold_start"] == 0
        # the wake is the scaler's own scale-up: counted, recorded, in the scale-down window
        assert auto.scaler.scale_events == {"up": 1} and auto.scaler.history[0].desired == 1
    finally:
        loop_thread.run(st.stop())


def test_a_cancelled_start_keeps_its_name_until_its_engine_is_stopped(auto_stack: Stack,
                                                                      loop_thread: LoopThread) -> None:
    # a replica that reused the name (and port) of a cancelled start still stopping was stopped by its
    # clean-up, which removed "engine-1" from the supervisor by name
    st = auto_stack
    auto, policy = st.autoscaler, st.autoscaler and st.autoscaler.scaler.policy
    assert auto is not None and isinstance(policy, StepPolicy)
    started, stopping, stop_gate = threading.Event(), threading.Event(), threading.Event()
    make, made = auto.actuator.factory, []

    def factory(i: int) -> Any:
        e, kv = make(i)
        made.append(e)
        if len(made) == 1:  # the start to cancel: its model load never ends, its stop waits for the test
            stop = e.stop

            async def stuck_start() -> None:
                started.set()
                await asyncio.Event().wait()

            async def held_stop(grace_s: float = 10.0) -> None:
                stopping.set()
                await asyncio.to_thread(stop_gate.wait, 60)
                await stop(grace_s)

            e.start, e.stop = stuck_start, held_stop
        return e, kv

    def step(level: int) -> None:
        policy.level = level
        loop_thread.call(auto.tick)

    auto.actuator.factory = factory
    try:
        step(2)
        assert started.wait(60)
        cancelled = auto.actuator.starting["engine-1"]
        step(1)  # scale-in: the start is cancelled
        assert stopping.wait(60)
        step(2)  # scale-out again while it is still stopping
        wait_until(lambda: len(auto.actuator.serving) == 2, 120, "the new replica serving")
    finally:
        stop_gate.set()
    wait_until(cancelled.done, 60, "the cancelled start's end")
    new = made[-1]
    assert set(auto.actuator.serving) == {e.name for e in st.supervisor.engines}  # was: the new one removed
    assert new.state is EngineState.READY and complete(new.url, [*HOT, 5])[0] == 200
    assert made[0].state is EngineState.STOPPED and not auto.actuator.draining
    assert new.name == "engine-2"  # engine-1 was still taken: the cancelled start was stopping it
    assert ("cancelled", "engine-1") in [(e["event"], e["replica"]) for e in auto.actuator.events]


def test_a_crashed_replica_counts_as_a_replica_not_as_ready(auto_stack: Stack, loop_thread: LoopThread) -> None:
    # through the supervisor's restart backoff and the new process's start it serves nothing
    st = auto_stack
    auto, b, victim = st.autoscaler, st.gateway.pool.get("engine-0"), engine(st, "engine-0")
    assert auto is not None and b is not None
    wait_until(lambda: b.up, 60, "engine-0 up")
    release = threading.Event()
    gate_start(victim, release)  # the restart's start waits for the test
    try:
        loop_thread.run(victim.kill())
        wait_until(lambda: not b.up, 60, "engine-0 down")
        loop_thread.call(auto.tick)
        assert (auto.scaler.history[-1].replicas, auto.scaler.history[-1].ready) == (1, 0)
    finally:
        release.set()
    wait_until(lambda: b.up, 60, "engine-0 restarted")
    loop_thread.call(auto.tick)
    assert (auto.scaler.history[-1].replicas, auto.scaler.history[-1].ready) == (1, 1)


def test_a_start_that_fails_after_the_supervisor_added_it_leaves_no_replica(auto_stack: Stack,
                                                                            loop_thread: LoopThread) -> None:
    st = auto_stack
    auto = st.autoscaler
    assert auto is not None and isinstance(auto.scaler.policy, StepPolicy)
    made = gate_starts(auto, None)

    async def broken_prewarm(e: Any) -> int:
        raise RuntimeError("pre-warm broke")

    auto.actuator.prewarm = broken_prewarm
    auto.scaler.policy.level = 2  # engine-1 starts, is added to the supervisor, then its pre-warm raises
    loop_thread.call(auto.tick)
    wait_until(lambda: not auto.actuator.starting, 120, "the start's end")
    assert [ev["event"] for ev in auto.actuator.events] == ["starting", "start_failed"]
    assert [e.name for e in st.supervisor.engines] == ["engine-0"]  # was: engine-1 too, watched, never served
    assert [b.name for b in st.gateway.pool.backends] == ["engine-0"] and made[0].state is EngineState.STOPPED


@pytest.fixture
def slo_stack(tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread) -> Iterator[Stack]:
    # the slo policy with targets every stream's TPOT misses and no TTFT misses (whatever the machine's speed)
    auto = LocalConfig(policy="slo", min_replicas=1, max_replicas=1, interval_s=3600, ramp_s=0,
                       tuning={"ttft_s": 1000.0, "tpot_s": 1e-9})
    st = make_stack(tmp_path, tiny_model, loop_thread, auto)
    yield st
    loop_thread.run(st.stop())


def test_local_signals_count_slo_misses_against_the_policys_targets(slo_stack: Stack,
                                                                    loop_thread: LoopThread) -> None:
    st = slo_stack
    auto, url = st.autoscaler, st.gateway.url
    assert auto is not None and auto.targets == (1000.0, 1e-9)
    assert slo_targets(make_policy("queue", auto.cfg.capacity)) is None  # no SLO: no misses counted
    loop_thread.call(auto.signals)  # a fresh window
    for i in range(3):
        assert stream(url, [*HOT, 900 + i])[-1] == "data: [DONE]"
    for i in range(2):  # whole answers: finished, never a miss (the gateway sees no first token)
        assert complete(url, [*HOT, 950 + i])[0] == 200
    wait_until(lambda: auto.window.arrivals == 5, 30, "5 requests observed")  # observers run after the relay
    g = loop_thread.call(auto.signals).role(AGGREGATED).gateway
    assert (g.finished, g.slo_missed_ttft, g.slo_missed_tpot) == (5, 0, 3)
    assert g.tpot_p50_s > 0 and g.ttft_p50_s > 0
    auto.targets = (1e-9, 1000.0)  # now every stream misses its TTFT and none its TPOT
    for i in range(2):
        stream(url, [*HOT, 970 + i])
    wait_until(lambda: auto.window.arrivals == 2, 30, "2 requests observed")
    g = loop_thread.call(auto.signals).role(AGGREGATED).gateway
    assert (g.finished, g.slo_missed_ttft, g.slo_missed_tpot) == (2, 2, 0)


def test_prompts_served_before_the_block_size_is_known_are_keyed_at_the_pre_warm(slo_stack: Stack,
                                                                                  loop_thread: LoopThread) -> None:
    # A fresh stack's first prompts can go before any KV event tells the router the block size, so they
    # carry no block keys; the autoscaler keeps their ids and keys them once the size is known.
    st = slo_stack
    auto = st.autoscaler
    assert auto is not None
    req = SimpleNamespace(route=SimpleNamespace(prompt_tokens_estimate=len(HOT), token_ids=[*HOT, 1],
                                                block_keys=None),
                          chunks=0, tenant=None)
    loop_thread.call(lambda: auto.observe(req))
    assert auto.unkeyed == [([*HOT, 1], None)] and not auto.prompts
    hear_engine0(st)
    loop_thread.call(auto._key_unkeyed)
    spec = st.gateway.policy.key_spec(None)
    assert spec is not None
    keys = list(block_keys([*HOT, 1], spec[0], spec[1]))
    assert auto.unkeyed == [] and auto.prompts[keys[-1]] == ([*HOT, 1], None)
    assert auto.hot.parent[keys[-1]] == keys[-2]
