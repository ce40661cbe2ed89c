"""Capacity planning (``kvmesh plan``): the cheapest cluster that meets a latency SLO on the user's own trace,
judged by the simulator running kvmesh's real router, KV index and cache-tier model.

Search space: a *shape* (routing policy × DRAM and SSD per machine × pooled or not) × the replica count.
The search simulates few points:

- **Bisection on replicas.**  For a fixed shape, more replicas never make latency worse (assumed: less
  queueing, more GPU cache), so the fewest replicas meeting the SLO is found by bisection (after doubling
  from one replica while no bound is known).
- **Giving up early.**  A run stops as soon as more requests missed a percentile target than the target
  allows: overloaded points cost a fraction of a full simulation.
- **Pruning by cost.**  Shapes are visited cheapest first.  Once a configuration meeting the SLO costs C, a
  shape can only win with a replica count whose cost stays below C; it is simulated at that largest
  affordable count first, and dropped (one simulation) if even that misses the SLO.  Points that cannot beat
  C are never simulated: they are dominated.
- Every simulated point is memoised; all runs are seeded, so a plan is reproducible.

Cost per hour = replicas × GPU-hour + machines × (DRAM GB × GB-hour + SSD GB × GB-hour), machines =
ceil(replicas / engines per machine).  SLO attainment (the Pareto chart's axis) is the share of requests
within every per-request threshold of the SLO.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from kvmesh.config import RoutingConfig
from kvmesh.index.hashing import root_seed
from kvmesh.sim.cluster import Cluster, _q, _tpot, make_requests
from kvmesh.sim.core import SimRequest
from kvmesh.sim.profiles import get_profile
from kvmesh.sim.tiers import TierConfig
from kvmesh.workloads import MOONCAKE_BLOCK, TraceRequest, mooncake_prompt

GB = 10**9
_SLO_RE = re.compile(r"^(ttft|tpot)_(p\d{1,2}|mean)$")
_UNITS = {"ms": 1e-3, "s": 1.0}


@dataclass(frozen=True, slots=True)
class SloSpec:
    """Latency targets, e.g. ``{"ttft_p90": 2.0, "tpot_p90": 0.05}`` (seconds)."""

    targets: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> SloSpec:
        """``ttft_p90=2s,tpot_p90=50ms``; raises ``ValueError``."""
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, val = part.partition("=")
            m = re.fullmatch(r"([0-9.]+)\s*(ms|s)?", val.strip())
            if not _SLO_RE.match(key.strip()) or m is None:
                raise ValueError(f"bad SLO term {part!r}; use e.g. ttft_p90=2s,tpot_p90=50ms")
            out.append((key.strip(), float(m.group(1)) * _UNITS[m.group(2) or "s"]))
        if not out:
            raise ValueError("empty SLO")
        return cls(tuple(out))

    def measure(self, done: Sequence[SimRequest]) -> dict[str, float]:
        series = {"ttft": sorted(r.first_token_at - r.arrival for r in done), "tpot": sorted(_tpot(r) for r in done)}
        out = {}
        for key, _ in self.targets:
            kind, stat = key.split("_")
            xs = series[kind]
            out[key] = sum(xs) / max(len(xs), 1) if stat == "mean" else _q(xs, int(stat[1:]) / 100)
        return out

    def give_up(self, total: int) -> Callable[[SimRequest], bool]:
        """A check told of each finished request: True once so many requests exceeded a percentile target
        that the whole run (``total`` requests) can no longer meet it.  Overloaded points end early."""
        limits = []
        for key, v in self.targets:
            kind, stat = key.split("_")
            if stat != "mean":
                limits.append((kind, v, total - int(int(stat[1:]) / 100 * total) - 1))
        over = [0] * len(limits)

        def check(r: SimRequest) -> bool:
            for i, (kind, v, allowed) in enumerate(limits):
                x = r.first_token_at - r.arrival if kind == "ttft" else _tpot(r)
                if x > v:
                    over[i] += 1
                    if over[i] > allowed:
                        return True
            return False

        return check

    def met(self, measured: dict[str, float]) -> bool:
        return all(measured[k] <= v for k, v in self.targets)

    def attainment(self, done: Sequence[SimRequest]) -> float:
        """Share of requests within the SLO's TTFT and TPOT thresholds (the first target of each kind)."""
        lim = {k.split("_")[0]: v for k, v in reversed(self.targets)}
        ttft, tpot = lim.get("ttft", math.inf), lim.get("tpot", math.inf)
        ok = sum(1 for r in done if r.first_token_at - r.arrival <= ttft and _tpot(r) <= tpot)
        return ok / max(len(done), 1)


@dataclass(frozen=True, slots=True)
class Prices:
    gpu_hour: float = 2.5        # one H100-class GPU, on demand
    dram_gb_hour: float = 0.004  # cloud memory premium per GB
    ssd_gb_hour: float = 0.0001  # local NVMe per GB


@dataclass(frozen=True, slots=True)
class Shape:
    policy: str
    dram_gb: int = 0
    ssd_gb: int = 0
    pooled: bool = False

    def tiers(self, per_machine: int) -> TierConfig | None:
        if not self.dram_gb and not self.ssd_gb:
            return None
        return TierConfig(engines_per_machine=per_machine, dram_bytes=self.dram_gb * GB, ssd_bytes=self.ssd_gb * GB,
                          pooled=self.pooled)

    def label(self) -> str:
        tier = "gpu" if not (self.dram_gb or self.ssd_gb) else f"dram {self.dram_gb} GB + ssd {self.ssd_gb} GB"
        return f"{self.policy}, {tier}{', pooled' if self.pooled else ''}"


@dataclass(slots=True)
class Point:
    shape: Shape
    replicas: int
    cost_per_hour: float
    measured: dict[str, float]
    attainment: float
    meets: bool
    hit_rate: float
    gave_up: bool = False  # stopped early: the SLO could no longer be met

    def row(self) -> dict[str, object]:
        return {**asdict(self.shape), "replicas": self.replicas, "cost_per_hour": round(self.cost_per_hour, 3),
                "measured": {k: round(v, 4) for k, v in self.measured.items()},
                "attainment": round(self.attainment, 4), "meets": self.meets, "hit_rate": round(self.hit_rate, 4),
                "gave_up": self.gave_up}


@dataclass(slots=True)
class PlanSpace:
    policies: tuple[str, ...] = ("kv-aware", "least-request")
    dram_gb: tuple[int, ...] = (0, 1000)
    ssd_gb: tuple[int, ...] = (0, 8000)
    pooled: tuple[bool, ...] = (False, True)
    max_replicas: int = 64
    engines_per_machine: int = 8
    budget: float | None = None  # $ per hour; dearer configurations are not considered

    def shapes(self) -> list[Shape]:
        out = []
        for p in self.policies:
            for d in self.dram_gb:
                for s in self.ssd_gb:
                    for pooled in self.pooled:
                        if pooled and not (d or s):
                            continue  # nothing to pool
                        out.append(Shape(p, d, s, pooled))
        return out


@dataclass(slots=True)
class Plan:
    best: Point | None
    tried: list[Point] = field(default_factory=list)
    validation: Point | None = None


class Planner:
    """Searches :class:`PlanSpace` for the cheapest point meeting ``slo`` (see the module docstring)."""

    def __init__(self, reqs: list[TraceRequest], slo: SloSpec, space: PlanSpace, prices: Prices,
                 profile: str = "h100-llama3-8b", tokens_per_block: int = 16,
                 routing: RoutingConfig | None = None, log: Callable[[str], None] | None = None) -> None:
        self.reqs, self.slo, self.space, self.prices = reqs, slo, space, prices
        self.profile, self.tpb, self.routing = get_profile(profile), tokens_per_block, routing
        self._log = log or (lambda _m: None)
        self._memo: dict[tuple[Shape, int], Point] = {}

    def cost(self, shape: Shape, replicas: int) -> float:
        machines = math.ceil(replicas / self.space.engines_per_machine)
        p = self.prices
        return replicas * p.gpu_hour + machines * (shape.dram_gb * p.dram_gb_hour + shape.ssd_gb * p.ssd_gb_hour)

    def evaluate(self, shape: Shape, replicas: int, reqs: list[TraceRequest] | None = None) -> Point:
        key = (shape, replicas)
        if reqs is None and key in self._memo:
            return self._memo[key]
        if reqs is None and shape.pooled and replicas <= self.space.engines_per_machine:
            # one machine: pooled and per-machine tiers are the same cluster
            same = self.evaluate(dataclasses.replace(shape, pooled=False), replicas)
            self._memo[key] = dataclasses.replace(same, shape=shape)
            return self._memo[key]
        pt = simulate(reqs or self.reqs, shape, replicas, self.space.engines_per_machine, self.slo,
                      self.profile.name, self.tpb, self.routing, self.cost(shape, replicas))
        if reqs is None:
            self._memo[key] = pt
            self._log(f"  {shape.label()} x{replicas}: ${pt.cost_per_hour:.2f}/h "
                      f"{'meets' if pt.meets else 'misses'} the SLO ({_fmt(pt.measured)})")
        return pt

    def search(self) -> Plan:
        shapes = sorted(self.space.shapes(), key=lambda s: (self.cost(s, 1), s.policy))
        best: Point | None = None
        for shape in shapes:
            hi = self.space.max_replicas
            if self.space.budget is not None:
                hi = self._affordable(shape, self.space.budget, inclusive=True)
            if best is not None:
                hi = min(hi, self._affordable(shape, best.cost_per_hour))
            if hi < 1:
                continue  # dominated: even one replica costs more than the best so far (or the budget)
            found = self._fewest(shape, hi, gallop=best is None)
            if found is not None and (best is None or found.cost_per_hour < best.cost_per_hour):
                best = found
        return Plan(best, sorted(self._memo.values(), key=lambda p: (p.cost_per_hour, -p.attainment)))

    def _affordable(self, shape: Shape, budget: float, inclusive: bool = False) -> int:
        """The most replicas of ``shape`` costing less than ``budget`` (or exactly it, ``inclusive``)."""
        n = 0
        while n < self.space.max_replicas and (c := self.cost(shape, n + 1)) <= budget and (inclusive or c < budget):
            n += 1
        return n

    def _fewest(self, shape: Shape, hi: int, gallop: bool) -> Point | None:
        """Fewest replicas <= ``hi`` meeting the SLO.  With no bound yet (``gallop``), 1, 2, 4, ... first:
        overloaded points are given up early, so climbing from below is cheaper than starting at ``hi``."""
        lo = 0  # lo misses (0 replicas trivially), hi meets
        if gallop:
            n = 1
            while n < hi and not self.evaluate(shape, n).meets:
                lo, n = n, 2 * n
            hi = min(n, hi)
        if not self.evaluate(shape, hi).meets:
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.evaluate(shape, mid).meets:
                hi = mid
            else:
                lo = mid
        return self.evaluate(shape, hi)


def simulate(reqs: list[TraceRequest], shape: Shape, replicas: int, per_machine: int, slo: SloSpec, profile: str,
             tokens_per_block: int, routing: RoutingConfig | None, cost: float) -> Point:
    prof = get_profile(profile)
    sim = make_requests([mooncake_prompt(r, tokens_per_block) for r in reqs], [r.arrival_s for r in reqs],
                        [r.output_tokens for r in reqs], tokens_per_block, root_seed("kvmesh"),
                        [r.session for r in reqs])
    cluster = Cluster(replicas, prof, shape.policy, tokens_per_block, MOONCAKE_BLOCK / tokens_per_block,
                      routing=routing, tiers=shape.tiers(per_machine))
    res = cluster.run(sim, slo.give_up(len(sim)))
    measured = slo.measure(cluster.done)
    meets = not cluster.gave_up and slo.met(measured)
    # a run given up early reports what it saw until then (attainment over the requests it finished)
    return Point(shape, replicas, cost, measured, slo.attainment(cluster.done), meets, res.hit_rate, cluster.gave_up)


def pareto(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both cost (lower) and attainment (higher), cheapest first."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost_per_hour, -p.attainment)):
        if not front or p.attainment > front[-1].attainment:
            front.append(p)
    return front


def split_trace(reqs: list[TraceRequest]) -> tuple[list[TraceRequest], list[TraceRequest]]:
    """First half to plan on, second half held back (re-based to start at time 0) to validate the winner."""
    half = len(reqs) // 2
    rest = reqs[half:]
    t0 = rest[0].arrival_s if rest else 0.0
    held = [TraceRequest(r.arrival_s - t0, r.input_tokens, r.output_tokens, r.block_ids, r.session) for r in rest]
    return reqs[:half], held


def _fmt(measured: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in measured.items())


def markdown(plan: Plan) -> str:
    lines = ["| policy | DRAM/machine | SSD/machine | pooled | replicas | $/hour | SLO | attainment | hit rate |",
             "| --- " * 9 + "|"]
    for p in plan.tried:
        s = p.shape
        lines.append(f"| {s.policy} | {s.dram_gb} GB | {s.ssd_gb} GB | {'yes' if s.pooled else 'no'} | {p.replicas} | "
                     f"{p.cost_per_hour:.2f} | {'met' if p.meets else 'missed'} ({_fmt(p.measured)}) | "
                     f"{p.attainment:.3f} | {p.hit_rate:.3f} |")
    return "\n".join(lines)


def config_toml(best: Point, per_machine: int, slo: SloSpec) -> str:
    """A kvmesh config (``kvmesh up --config``) for one machine of the winning plan."""
    s, machines = best.shape, math.ceil(best.replicas / per_machine)
    lines = [f"# kvmesh plan: {best.replicas} replicas on {machines} machine(s), {s.label()}; "
             f"${best.cost_per_hour:.2f}/hour; SLO {', '.join(f'{k}<={v:g}s' for k, v in slo.targets)}",
             "# one machine's config: run it on each machine", "",
             "[supervisor]", f"replicas = {min(best.replicas, per_machine)}", "",
             "[gateway]", f'policy = "{s.policy}"', "",
             "[cache]", f"enabled = {str(bool(s.dram_gb or s.ssd_gb)).lower()}"]
    if s.dram_gb or s.ssd_gb:
        lines += [f"dram_mib = {max(1, s.dram_gb * GB // 2**20)}", f"ssd_mib = {s.ssd_gb * GB // 2**20}"]
        if s.pooled:
            lines += ["peer_port = 0  # join the pool: list the other machines in peers, or use etcd"]
    return "\n".join(lines) + "\n"


def write_png(plan: Plan, path: str) -> bool:
    """Cost vs SLO attainment of every point tried, the Pareto front drawn; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p.cost_per_hour for p in plan.tried], [p.attainment for p in plan.tried], s=14, c="0.6",
               label="simulated")
    front = pareto(plan.tried)
    ax.plot([p.cost_per_hour for p in front], [p.attainment for p in front], "o-", c="C0", label="Pareto front")
    if plan.best is not None:
        ax.scatter([plan.best.cost_per_hour], [plan.best.attainment], s=80, marker="*", c="C3", zorder=3,
                   label=f"chosen: {plan.best.shape.label()} x{plan.best.replicas}")
    ax.set_xlabel("$ per hour")
    ax.set_ylabel("share of requests within the SLO")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
