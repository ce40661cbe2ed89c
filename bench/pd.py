"""Prefill/decode disaggregation in virtual time: 8 aggregated H100s vs the best xPyD split of the same 8.

Every configuration runs the same requests through the simulator (``kvmesh.sim.pd``: the gateway's
decode-first flow and its shared decision, kv-aware routing with the profile's true figures), H100 /
Llama-3-8B: 128 KiB of KV per token moved over 25 GB/s RDMA per engine, not overlapped with the prefill
(``kvmesh.sim.profiles``).  The P/D decision is the gateway's default cost rule (``kvmesh.routing.disagg``:
remote prefill when a local one — with the prompt tokens already queued there and the step's fixed
overhead — would stall the decode engine's running streams past the 50 ms TPOT budget at a TTFT cost within
0.5 s per budget of stall, or saves more than 0.5 s; from 256 uncached tokens; a prefill engine saturated
past a 2 s queue); ``--decision threshold`` takes every long prompt remote instead (llm-d's rule).

- **SLO**: TTFT <= 2 s and TPOT (mean per request after the first token) <= 50 ms.
- **Goodput**: the highest arrival rate at which >= 90 % of requests meet both (DistServe's definition),
  found by doubling the trace's own rate until attainment drops below 90 %, then bisecting (attainment is
  taken to fall with the rate).  A run stops early once more than 10 % have missed: it cannot pass.
- **Workloads**: long prompts — the Azure code trace (context mean 2k tokens, output 28; no prefix
  information) and the Mooncake conversation trace (input mean 12k, output 343, shared prefixes) — and
  chat (kvmesh's multi-turn generator: a shared system prompt, each turn extends the session's history).
- Splits 1P7D … 7P1D are all searched, and **dynamic P/D**: 8 ``both`` engines, any of which may prefill
  for another when the rule says it pays (``[gateway.pd] dynamic``).  TTFT/TPOT percentiles are reported at
  the aggregated fleet's goodput rate (where it is stressed), for it and the best configuration.  Chat TTFT
  is compared at half the aggregated fleet's chat goodput rate (moderate load).
- **The best configuration** of a workload — the one ``pd_goodput_over_agg`` and ``chat_ttft_pd_over_agg``
  report — is chosen by the rule a user sizing a fleet would apply (:data:`BEST_RULE`): the highest
  goodput; configurations within ``--tie`` (5 %) of it are tied (the search's grid steps by
  ``2 ** (1 / 2 ** bisect)``: 19 % at ``--bisect 2``, so a tie means the same grid point), and the tie goes
  to the lowest mean TTFT at half the aggregated fleet's goodput rate (moderate load); ``best_xpyd`` is the
  same rule over the fixed splits only.  Each workload's ``selection`` records the tied configurations and
  their mean TTFTs.

Prompts are the traces' block ids as tokens (``kvmesh.workloads.mooncake_prompt``).  Writes
``bench/results/pd.json``; ``--real`` adds the real vLLM-CPU part
(``bench/pd_real.py``) when that file is present.

    python bench/pd.py [--limit-azure 2000 --limit-mooncake 1000 --chat-sessions 150] [--decision cost] [--tie 0.05]
                       [--real]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.index.hashing import root_seed
from kvmesh.routing.disagg import DecisionRule, PdConfig, Role
from kvmesh.sim.cluster import Cluster, SimResult, Slo, make_requests
from kvmesh.sim.core import SimRequest
from kvmesh.sim.profiles import get_profile
from kvmesh.workloads import MOONCAKE_BLOCK, TraceRequest, load_trace, mooncake_prompt, multi_turn_chat

TRACES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "traces"
SLO = Slo(ttft_s=2.0, tpot_s=0.05)
ATTAIN = 0.9
TPB = 16  # simulated tokens per 512-token trace block (token scale 32)
GPUS = 8
DYNAMIC = -1  # the configuration "8 both engines with dynamic P/D", among the prefill counts
TIE = 0.05  # goodputs within this share of the highest are tied (``--tie``)
BEST_RULE = ("highest goodput; configurations within {tie:.0%} of it are tied, and the tie goes to the lowest "
             "mean TTFT at half the aggregated fleet's goodput rate")


@dataclasses.dataclass
class Workload:
    name: str
    reqs: list[TraceRequest]
    prompts: list[list[int]]
    base_rate: float  # requests/s of the trace as recorded

    def requests(self, mult: float) -> list[SimRequest]:
        return make_requests(self.prompts, [r.arrival_s / mult for r in self.reqs],
                             [r.output_tokens for r in self.reqs], TPB, root_seed("kvmesh"),
                             [r.session for r in self.reqs])


def workload(name: str, reqs: list[TraceRequest]) -> Workload:
    span = max(reqs[-1].arrival_s - reqs[0].arrival_s, 1e-9)
    return Workload(name, reqs, [mooncake_prompt(r, TPB) for r in reqs], len(reqs) / span)


def roles_of(prefill: int) -> list[Role] | None:
    p: list[Role] = ["prefill"]
    d: list[Role] = ["decode"]
    return p * prefill + d * (GPUS - prefill) if prefill > 0 else None


def simulate(w: Workload, prefill: int, mult: float, pd: PdConfig, stop_early: bool = True) -> SimResult:
    reqs = w.requests(mult)
    budget = int((1 - ATTAIN) * len(reqs))
    missed = 0

    def give_up(r: SimRequest) -> bool:
        nonlocal missed
        ok = r.first_token_at - r.arrival <= SLO.ttft_s and _tpot(r) <= SLO.tpot_s
        missed += not ok
        return stop_early and missed > budget

    cl = Cluster(GPUS, get_profile("h100-llama3-8b"), "kv-aware", TPB, MOONCAKE_BLOCK / TPB, slo=SLO,
                 informed=True, roles=roles_of(prefill), pd=dataclasses.replace(pd, dynamic=prefill == DYNAMIC))
    res = cl.run(reqs, give_up)
    if cl.gave_up:
        res.goodput = 0.0  # stopped: more than 10 % missed
    return res


def _tpot(r: SimRequest) -> float:
    return (r.done_at - r.first_token_at) / (r.generated - 1) if r.generated > 1 else 0.0


def max_rate(w: Workload, prefill: int, pd: PdConfig, steps: int, log: Callable[[str], None]) -> float:
    """The highest rate multiplier (of the trace's own) at which >= 90 % meet the SLO (0 if none of 1/8 does)."""
    def ok(m: float) -> bool:
        return simulate(w, prefill, m, pd).goodput >= ATTAIN

    lo, hi = 0.0, 1.0
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 256:
            log(f"  {w.name} {label(prefill)}: meets the SLO up to x{lo:g} of the trace rate (search cap)")
            return lo
    if lo == 0.0:
        lo, hi = (0.0, 1.0) if not ok(1 / 8) else (1 / 8, 1.0)
        if lo == 0.0:
            return 0.0
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    log(f"  {w.name} {label(prefill)}: goodput x{lo:.2f} of the trace rate = {lo * w.base_rate:.2f} req/s")
    return lo


def label(prefill: int) -> str:
    if prefill == DYNAMIC:
        return f"{GPUS} dynamic"
    return f"{prefill}P{GPUS - prefill}D" if prefill else f"{GPUS} aggregated"


def row(r: SimResult) -> dict[str, Any]:
    out: dict[str, Any] = {"ttft_p50_ms": round(r.ttft_p50_s * 1000, 1), "ttft_p99_ms": round(r.ttft_p99_s * 1000, 1),
                           "tpot_p50_ms": round(r.tpot_p50_s * 1000, 2), "tpot_p99_ms": round(r.tpot_p99_s * 1000, 2),
                           "slo_attainment": round(r.goodput, 4), "hit_rate": round(r.hit_rate, 4)}
    if r.pd:
        pd = r.pd
        out["pd"] = {"remote_prefills": pd["remote_prefills"], "local_by_reason": pd["local_by_reason"],
                     "transfer_gb": round(pd["transfer_bytes"] / 1e9, 1),
                     "transfer_mean_ms": round(pd["transfer_mean_s"] * 1000, 1),
                     "transfer_p99_ms": round(pd["transfer_p99_s"] * 1000, 1),
                     "busy_share": {k: round(v["busy_share"], 3) for k, v in pd["roles"].items()}}
    return out


@dataclasses.dataclass
class Search:
    """One workload's goodput search: every configuration's rate multiplier, and the best one by the rule."""

    w: Workload
    pd: PdConfig
    tie: float
    rates: dict[int, float]
    _ttft: dict[int, float] = dataclasses.field(default_factory=dict)

    @property
    def moderate(self) -> float:
        """Half the aggregated fleet's goodput rate (a multiplier of the trace's)."""
        return self.rates[0] / 2 or 0.5

    def mean_ttft_s(self, p: int) -> float:
        if p not in self._ttft:
            self._ttft[p] = simulate(self.w, p, self.moderate, self.pd, stop_early=False).ttft_mean_s
        return self._ttft[p]

    def tied(self, configs: list[int]) -> list[int]:
        top = max(self.rates[p] for p in configs)
        return [p for p in configs if self.rates[p] >= top * (1 - self.tie)]

    def best(self, configs: list[int]) -> int:
        """:data:`BEST_RULE` over ``configs``: the highest goodput, a tie to the lowest mean TTFT."""
        tied = self.tied(configs)
        if len(tied) == 1:
            return tied[0]
        return min(tied, key=lambda p: (self.mean_ttft_s(p), -self.rates[p]))

    def selection(self, configs: list[int]) -> dict[str, Any]:
        tied = self.tied(configs)
        return {"tied": [label(p) for p in tied],
                "ttft_mean_ms_at_half_agg_goodput_rate": {label(p): round(self.mean_ttft_s(p) * 1000, 1)
                                                          for p in tied if len(tied) > 1}}


def compare(w: Workload, pd: PdConfig, splits: list[int], steps: int, tie: float,
            log: Callable[[str], None]) -> tuple[dict[str, Any], int, Search]:
    """Goodput of every configuration; percentiles of aggregated and the best configuration (by
    :data:`BEST_RULE`) at aggregated's rate.  Also returns the best configuration and the search."""
    t0 = time.perf_counter()
    s = Search(w, pd, tie, {p: max_rate(w, p, pd, steps, log) for p in [0, *splits]})
    best = s.best(splits)
    fixed = [p for p in splits if p > 0]
    ref = s.rates[0] or 1.0
    agg = max(s.rates[0], 1e-9)
    at_ref = {label(p): row(simulate(w, p, ref, pd, stop_early=False)) for p in (0, best)}
    return {"requests": len(w.reqs), "trace_rate_rps": round(w.base_rate, 3),
            "goodput_rps": {label(p): round(m * w.base_rate, 3) for p, m in s.rates.items()},
            "best_split": label(best), "selection": s.selection(splits),
            "pd_goodput_over_agg": round(s.rates[best] / agg, 3),
            **({"best_xpyd": label(bx := s.best(fixed)), "xpyd_goodput_over_agg": round(s.rates[bx] / agg, 3)}
               if fixed else {}),
            "at_agg_goodput_rate": {"rate_rps": round(ref * w.base_rate, 3), **at_ref},
            "wall_s": round(time.perf_counter() - t0, 1)}, best, s


def chat(w: Workload, pd: PdConfig, splits: list[int], steps: int, tie: float,
         log: Callable[[str], None]) -> dict[str, Any]:
    """As :func:`compare`, plus TTFT at half aggregated's goodput rate, for the best configuration and the best
    fixed split (and that split under the other decision rule)."""
    out, best, s = compare(w, pd, splits, steps, tie, log)
    moderate = s.moderate
    agg, split = (simulate(w, p, moderate, pd, stop_early=False) for p in (0, best))
    out["at_half_agg_goodput_rate"] = {"rate_rps": round(moderate * w.base_rate, 3), label(0): row(agg),
                                       label(best): row(split)}
    out["chat_ttft_pd_over_agg"] = round(split.ttft_p50_s / max(agg.ttft_p50_s, 1e-9), 3)
    out["chat_ttft_mean_pd_over_agg"] = round(split.ttft_mean_s / max(agg.ttft_mean_s, 1e-9), 3)
    out["chat_ttft_p99_pd_over_agg"] = round(split.ttft_p99_s / max(agg.ttft_p99_s, 1e-9), 3)
    bx = s.best([p for p in splits if p > 0])
    other: DecisionRule = "threshold" if pd.decision == "cost" else "cost"
    for name, cfg in ((pd.decision, pd), (other, dataclasses.replace(pd, decision=other))):
        r = simulate(w, bx, moderate, cfg, stop_early=False)
        out[f"{label(bx)}_{name}"] = {**row(r), "ttft_pd_over_agg": round(r.ttft_p50_s / max(agg.ttft_p50_s, 1e-9), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--azure", type=pathlib.Path, default=TRACES / "azure2023" / "AzureLLMInferenceTrace_code.csv")
    ap.add_argument("--mooncake", type=pathlib.Path, default=TRACES / "mooncake" / "conversation_trace.jsonl")
    ap.add_argument("--limit-azure", type=int, default=2000)
    ap.add_argument("--limit-mooncake", type=int, default=1000)
    ap.add_argument("--chat-sessions", type=int, default=150)
    ap.add_argument("--splits", default="1,2,3,4,5,6,7,-1", help="prefill engine counts to try (of 8; -1: "
                    "8 engines with dynamic P/D)")
    ap.add_argument("--bisect", type=int, default=3, help="bisection steps after the doubling search")
    ap.add_argument("--min-remote", type=int, default=256, help="[gateway.pd] min_remote_prefill_tokens")
    ap.add_argument("--decision", choices=("cost", "threshold"), default="cost", help="[gateway.pd] decision")
    ap.add_argument("--tie", type=float, default=TIE, help="goodputs within this share of the highest are tied; "
                    "the tie goes to the lowest mean TTFT at half the aggregated goodput rate")
    ap.add_argument("--real", action="store_true", help="also run bench/pd_real.py's vLLM-CPU part")
    ap.add_argument("--name", default="pd")
    a = ap.parse_args()
    pd = PdConfig(min_remote_prefill_tokens=a.min_remote, decision=a.decision)
    splits = [int(x) for x in a.splits.split(",")]
    metrics: dict[str, Any] = {
        "profile": "h100-llama3-8b", "gpus": GPUS, "policy": "kv-aware (informed)", "kv_transfer_gbps": 25.0,
        "transfer_overlaps_prefill": False, "slo": {"ttft_s": SLO.ttft_s, "tpot_s": SLO.tpot_s},
        "goodput_definition": "highest arrival rate with >= 90% of requests meeting both SLOs",
        "pd_config": dataclasses.asdict(pd), "best_config_rule": BEST_RULE.format(tie=a.tie),
        "tie_tolerance": a.tie, "workloads": {}}
    long_prompt: list[tuple[str, float]] = []
    for name, path, fmt, limit in (("azure_code", a.azure, "azure", a.limit_azure),
                                   ("mooncake", a.mooncake, "mooncake", a.limit_mooncake)):
        if not path.is_file():
            print(f"skipping {name}: trace not found at {path} (see ../shared/traces/README.md)")
            continue
        out, _, _ = compare(workload(name, load_trace(path, fmt, limit)), pd, splits, a.bisect, a.tie, print)
        metrics["workloads"][name] = out
        long_prompt.append((name, out["pd_goodput_over_agg"]))
    if long_prompt:
        metrics["pd_goodput_over_agg"] = min(v for _, v in long_prompt)  # the less favourable trace
        metrics["pd_goodput_over_agg_by_workload"] = dict(long_prompt)
    cw = workload("chat", multi_turn_chat(a.chat_sessions, 6, rate=1.0, think_s=5.0, output_tokens=128, seed=1))
    metrics["workloads"]["chat"] = chat(cw, pd, splits, a.bisect, a.tie, print)
    metrics["chat_ttft_pd_over_agg"] = metrics["workloads"]["chat"]["chat_ttft_pd_over_agg"]
    if a.real:
        metrics["real"] = real_part()
    print(f"wrote {write_result(a.name, metrics)}")


def real_part() -> dict[str, Any]:
    try:
        from bench import pd_real
    except ImportError as e:
        return {"skipped": f"bench/pd_real.py not importable: {e}"}
    return pd_real.run_real(pd_real.parser().parse_args([]))


if __name__ == "__main__":
    main()
