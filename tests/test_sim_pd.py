"""Prefill/decode disaggregation in the virtual-time simulator (kvmesh.sim.pd): what moves, when, and that the
simulator decides with the gateway's own code."""

from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from kvmesh import cli
from kvmesh.config import RoutingConfig
from kvmesh.gateway import pd as gateway_pd
from kvmesh.index.hashing import block_keys, root_seed
from kvmesh.routing import Decision, RequestContext, disagg
from kvmesh.routing.disagg import PdConfig, Role
from kvmesh.sim import pd as sim_pd
from kvmesh.sim.cluster import Cluster
from kvmesh.sim.core import SimRequest
from kvmesh.sim.profiles import get_profile

SEED = root_seed("kvmesh")
H100 = get_profile("h100-llama3-8b")
BS = 16
ONE_P_ONE_D: list[Role] = ["prefill", "decode"]
THRESHOLD = PdConfig(decision="threshold")  # every long prompt remote: for the tests of what moves and when


def req(rid: int, tokens: list[int], arrival: float, out: int = 4) -> SimRequest:
    return SimRequest(rid, tokens, list(block_keys(tokens, BS, SEED)), out, arrival)


def cluster(roles: list[Role], policy: str = "kv-aware", **kw: Any) -> Cluster:
    kw.setdefault("pd", THRESHOLD)
    return Cluster(len(roles), H100, policy, BS, roles=roles, informed=True, **kw)


def test_remote_prefill_then_transfer_then_first_decode_step() -> None:
    """TTFT = the prefill leg's step + bytes / bandwidth (+ the fixed latency) + the decode engine's step that
    computes the last prompt token; nothing else is charged."""
    prompt = list(range(4000))
    r = req(0, prompt, 0.0)
    res = cluster(ONE_P_ONE_D, "round-robin").run([r])
    n, bpt = len(prompt), H100.kv_bytes_per_token
    prefill = H100.step_seconds(n, n * (n / 2), 0, 0)
    transfer = H100.kv_transfer_latency_s + n * bpt / (H100.kv_transfer_gbps * 1e9)
    first_step = H100.step_seconds(1, 1 * (n - 1 + 0.5), 0, 0)
    assert r.engine == "e1" and r.transferred == n - 1 and r.cached == 0
    assert r.first_token_at == pytest.approx(prefill + transfer + first_step)
    assert res.pd["remote_prefills"] == 1 and res.pd["local_prefills"] == 0
    assert res.pd["transfer_bytes"] == n * bpt
    assert res.pd["transfer_mean_s"] == pytest.approx(transfer)
    assert res.pd["roles"]["prefill"]["computed_tokens"] == n      # the prefill engine computed the prompt
    assert res.pd["roles"]["decode"]["computed_tokens"] == 1       # the decode engine only the last token


def test_decode_engine_hits_what_it_received_and_short_prompt_stays_local() -> None:
    """A's KV lands on the decode engine as cached blocks (and KV events): B, which shares A's first 248
    blocks and adds 50 tokens, finds them there, so it has too few uncached tokens to pay a hop; C adds
    984 uncached tokens and goes remote, moving only what the decode engine lacks."""
    rest = list(range(100_000, 102_000))
    a = req(0, list(range(4000)), 0.0)
    b = req(1, a.tokens[:3968] + rest[:50], 5.0)
    c = req(2, a.tokens[:3984] + rest[:984], 10.0)
    cl = cluster(ONE_P_ONE_D)
    res = cl.run([a, b, c])
    received = (len(a.tokens) - 1) // BS                  # full blocks before the last token
    assert set(a.keys[:received]) <= cl.index.engine_keys("e1")  # announced by the decode engine
    assert b.engine == "e1" and b.cached == 3968 and not b.remote_kv
    assert c.remote_kv and c.cached == 3984 and c.transferred == len(c.tokens) - 1 - 3984
    assert res.pd["local_by_reason"] == {"short_prompt": 1} and res.pd["remote_prefills"] == 2
    assert res.pd["transfer_bytes"] == (len(a.tokens) + len(c.tokens) - 3984) * H100.kv_bytes_per_token


def test_saturated_prefill_engine_means_local_prefill() -> None:
    """Two long prompts at once: the second finds the prefill engine's queue (4,000 tokens at the config's
    4,000 tokens/s: 1 s) over the limit, so its decode engine prefills it."""
    r1, r2 = req(0, list(range(4000)), 0.0), req(1, list(range(50_000, 54_000)), 0.0)
    cl = Cluster(2, H100, "round-robin", BS, roles=ONE_P_ONE_D, routing=RoutingConfig(prefix_block_size=BS),
                 pd=PdConfig(max_prefill_queue_s=0.5, decision="threshold"))
    res = cl.run([r1, r2])
    assert res.pd["local_by_reason"] == {"prefill_saturated": 1} and res.pd["remote_prefills"] == 1
    assert r1.remote_kv and not r2.remote_kv and r2.engine == "e1"


def test_aggregated_cluster_has_no_pd_stage() -> None:
    r = req(0, list(range(4000)), 0.0)
    res = Cluster(2, H100, "kv-aware", BS).run([r])
    assert res.pd == {} and not r.remote_kv


def test_sim_decides_with_the_shared_decision_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every arrival goes through disagg.decide (the gateway's ranking and cost rule); the simulator's counts
    are exactly what it answered."""
    answered: list[str] = []

    def spy(*args: Any) -> Any:
        out = disagg.decide(*args)
        answered.append(out.reason)
        return out

    monkeypatch.setattr(sim_pd, "decide", spy)
    lengths = [100, 3000, 2000, 50, 4000, 200]
    reqs = [req(i, list(range(i * 10_000, i * 10_000 + n)), i * 0.01) for i, n in enumerate(lengths)]
    res = cluster(["prefill", "decode", "decode"], pd=PdConfig()).run(reqs)
    counted = {"remote": res.pd["remote_prefills"], **res.pd["local_by_reason"]}
    assert sorted(answered) == sorted(k for k, v in counted.items() for _ in range(v))
    assert len(answered) == len(reqs)


def test_cost_rule_spares_a_busy_decode_engine_not_an_idle_one() -> None:
    """A long prompt reaching an idle decode engine is prefilled there (nothing to stall); the same length
    arriving while 40 streams decode there goes to the prefill engine (8,000 tokens would freeze them for
    ~0.2 s, far past the 50 ms budget).  A burst of 40 300-token prompts (7 ms of prefill each): the first
    few stay local, then the prefills queued before each push the step past the budget and the rest go
    remote — judged one at a time, all 40 would pile up on the decode engine."""
    first = req(0, list(range(8000)), 0.0, out=200)
    streams = [req(i, list(range(i * 1000, i * 1000 + 300)), 0.5, out=200) for i in range(10, 50)]
    late = req(1, list(range(900_000, 908_000)), 1.0)
    res = cluster(ONE_P_ONE_D, pd=PdConfig()).run([first, *streams, late])
    assert not first.remote_kv and late.remote_kv
    local = [s.remote_kv for s in streams].index(True)
    assert 1 <= local < 10 and all(s.remote_kv for s in streams[local:])
    assert res.pd["remote_prefills"] == 1 + 40 - local and res.pd["local_by_reason"] == {"no_stall": 1 + local}


def test_dynamic_pd_lets_a_both_engine_prefill_for_another() -> None:
    """``dynamic``: with no prefill-role engine, the busy engine's long prompt is prefilled on the idle one."""
    streams = [req(i, list(range(i * 1000, i * 1000 + 300)), 0.0, out=200) for i in range(10, 50)]
    late = req(1, list(range(900_000, 908_000)), 1.0)
    cl = cluster(["both", "both"], "round-robin", pd=PdConfig(dynamic=True))
    assert cl.pd is not None and Cluster(2, H100, "kv-aware", BS).pd is None  # off unless asked for
    res = cl.run([*streams, late])
    # the burst of streams counts too: past a few queued prompts, some are prefilled on the other engine
    assert late.remote_kv and res.pd["remote_prefills"] > 1
    assert res.pd["roles"]["both"]["engines"] == 2


# (uncached tokens on the decode engine, pending prefill tokens on e0 and e1, max queue s, streams running on
# the decode engine e2, threshold rule)
TABLE = [(100, (0, 0), 2.0, 0, False), (255, (0, 0), 2.0, 8, True), (256, (0, 0), 2.0, 8, True),
         (5000, (0, 0), 2.0, 0, False), (5000, (0, 0), 2.0, 8, False), (5000, (9000, 0), 2.0, 8, False),
         (5000, (9000, 9000), 2.0, 8, False), (5000, (0, 9000), 2.0, 8, False), (5000, (8000, 8000), 2.0, 8, True),
         (5000, (100, 50), 0.0, 8, False), (5000, (0, 0), 0.0, 8, True), (50_000, (0, 0), 2.0, 0, False),
         (5000, (90_000, 90_000), 30.0, 8, False), (1000, (0, 0), 2.0, 64, False)]


@pytest.mark.parametrize(("uncached", "pending", "max_q", "running", "threshold"), TABLE)
def test_sim_and_gateway_make_the_same_plan(uncached: int, pending: tuple[int, int], max_q: float, running: int,
                                            threshold: bool) -> None:
    """The simulator's plan and the gateway's ``plan_for`` over the same candidates, load and policy: one
    ranking and one rule (``disagg.decide``), whatever the inputs."""
    cfg = PdConfig(max_prefill_queue_s=max_q, decision="threshold" if threshold else "cost")

    def plan(side: str) -> object:
        cl = Cluster(3, H100, "kv-aware", BS, roles=["prefill", "prefill", "decode"], seed=7, pd=cfg)
        for b, p in zip(cl.backends, pending, strict=False):
            b.pending_prefill_tokens = p
        cl.backends[2].running = running
        ctx = RequestContext("r", "sim", "completions", prompt_tokens_estimate=uncached + 16)
        d = Decision(cl.by_name["e2"], prefill_tokens=uncached)
        if side == "sim":
            assert cl.pd is not None
            return cl.pd.plan(ctx, d)
        gw = SimpleNamespace(pool=SimpleNamespace(backends=cl.backends), policy=cl.policy,
                             cfg=SimpleNamespace(routing=cl.routing))
        return gateway_pd.plan_for(gw, SimpleNamespace(route=ctx), d, cl.pd.sim_cfg)  # type: ignore[arg-type,union-attr]

    sim = plan("sim")
    assert sim == plan("gateway")
    reasons = {"remote", *disagg.LOCAL_REASONS}
    assert getattr(sim, "reason", None) in reasons


def test_cli_sim_prefill_decode(tmp_path: pathlib.Path) -> None:
    trace = tmp_path / "t.jsonl"
    # 10 ms apart with long answers: the decode engines are busy when the later prompts arrive, so they go remote
    rows = [{"timestamp": i * 10, "input_length": 16384, "output_length": 200,
             "hash_ids": [i * 100 + j for j in range(32)]} for i in range(6)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = CliRunner().invoke(cli.app, ["sim", "--trace", str(trace), "--prefill", "1", "--decode", "2",
                                       "--policy", "kv-aware"])
    assert out.exit_code == 0, out.output
    assert "1P2D" in out.output and "remote prefills 4" in out.output, out.output
