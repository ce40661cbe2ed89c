"""``kvmesh up --autoscale`` on simulated engines: scale out (start, pre-warm, ramp in) and back in (cache-aware
victim, drain, stop) under a step load, with no failed request and no stream cut.

The step is scripted: the test sets the load level a step policy reads, and calls the control tick itself
(no timer), so what happens depends on events, not on how fast the machine runs.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import re
from collections.abc import Iterator, Mapping

import httpx
import pytest

from kvmesh.autoscale.core import Decision, Fleet, Policy
from kvmesh.autoscale.local import LocalConfig
from kvmesh.autoscale.signals import AGGREGATED, Signals
from kvmesh.config import CacheNodeConfig, GatewayConfig, StackConfig, SupervisorConfig, engine_config
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


@pytest.fixture
def auto_stack(tmp_path: pathlib.Path, tiny_model: pathlib.Path, loop_thread: LoopThread) -> Iterator[Stack]:
    cfg = StackConfig(model_size="tiny", models_dir=str(tiny_model.parent),
                      engine=engine_config(kind="sim", model=str(tiny_model), served_model_name=DEMO_MODEL_NAME),
                      supervisor=SupervisorConfig(replicas=1, base_port=free_port_block(2), run_dir=str(tmp_path)),
                      gateway=GatewayConfig(port=0, policy="kv-aware", health_interval_s=0.5),
                      cache=CacheNodeConfig(enabled=False))
    auto = LocalConfig(policy="hpa", min_replicas=1, max_replicas=2, interval_s=3600, ramp_s=0)
    st = loop_thread.call(lambda: Stack(cfg, autoscale=auto))
    loop_thread.run(st.start(wait=True))
    assert st.autoscaler is not None
    st.autoscaler.scaler.policy = StepPolicy()
    yield st
    loop_thread.run(st.stop())


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


def test_scales_out_prewarmed_and_back_in_without_failing_a_request(auto_stack: Stack,
                                                                    loop_thread: LoopThread) -> None:
    st = auto_stack
    auto, url = st.autoscaler, st.gateway.url
    assert auto is not None
    policy = auto.scaler.policy
    assert isinstance(policy, StepPolicy)
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
    dbg = httpx.get(f"{url}/debug/autoscale").json()
    assert dbg["enabled"] and dbg["policy"] == "step" and dbg["scale_events"] == {"up": 1, "down": 1}
    assert [d["desired"] for d in dbg["decisions"]] == [2, 1]
    assert dbg["decisions"][0]["reason"] == "scripted step to 2" and "in_flight" in dbg["decisions"][0]["inputs"]
    assert "queued_prefill_tokens" in dbg["pressure"]
