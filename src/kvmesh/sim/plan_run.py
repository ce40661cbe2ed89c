"""``kvmesh plan`` end to end: load the trace, plan on its first half, validate the winner on the held-back
second half, and write the report (JSON, a kvmesh config for the winner, the Pareto chart)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable

from kvmesh.sim.plan import (
    Plan,
    Planner,
    PlanSpace,
    Prices,
    SloSpec,
    config_toml,
    markdown,
    pareto,
    split_trace,
    write_png,
)
from kvmesh.workloads import load_trace


def run_plan(trace: pathlib.Path, fmt: str, slo: SloSpec, space: PlanSpace, prices: Prices, profile: str,
             limit: int | None, out: pathlib.Path | None, echo: Callable[[str], None]) -> str:
    """Returns the report's text; raises ``TraceError`` / ``ValueError`` for bad input."""
    if space.max_replicas < 1 or space.engines_per_machine < 1:
        raise ValueError("--max-replicas and --per-machine must be >= 1")
    reqs = load_trace(trace, fmt, limit)
    if len(reqs) < 4:
        raise ValueError(f"{trace}: too few requests to plan on ({len(reqs)})")
    plan_on, held = split_trace(reqs)
    t0 = time.perf_counter()
    planner = Planner(plan_on, slo, space, prices, profile, log=echo)
    echo(f"planning on {len(plan_on)} requests, {len(space.shapes())} shapes x up to {space.max_replicas} replicas")
    result = planner.search()
    if result.best is not None:
        result.validation = planner.evaluate(result.best.shape, result.best.replicas, held)
    wall = time.perf_counter() - t0
    text = _summary(result, wall, len(held))
    if out is not None:
        _write(out, result, slo, space, prices, wall)
        text += f"\nwrote {out.with_suffix('.json')}" + (f", {out.with_suffix('.toml')}" if result.best else "")
    return text


def _summary(plan: Plan, wall: float, held: int) -> str:
    lines = [markdown(plan), ""]
    b, v = plan.best, plan.validation
    if b is None:
        lines.append("No configuration within --max-replicas (and --budget) meets the SLO.")
    else:
        lines.append(f"Cheapest meeting the SLO: {b.shape.label()}, {b.replicas} replicas, ${b.cost_per_hour:.2f}/hour "
                     f"(attainment {b.attainment:.3f}).")
        if v is not None:
            lines.append(f"Held-back half ({held} requests): {'meets' if v.meets else 'MISSES'} the SLO "
                         f"({', '.join(f'{k} {x * 1000:.0f} ms' for k, x in v.measured.items())}).")
    lines.append(f"{len(plan.tried)} points simulated in {wall:.0f} s.")
    return "\n".join(lines)


def _write(out: pathlib.Path, plan: Plan, slo: SloSpec, space: PlanSpace, prices: Prices, wall: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"slo": dict(slo.targets), "prices": dataclasses.asdict(prices),
           "space": {"policies": space.policies, "dram_gb": space.dram_gb, "ssd_gb": space.ssd_gb,
                     "pooled": space.pooled, "max_replicas": space.max_replicas,
                     "engines_per_machine": space.engines_per_machine, "budget": space.budget},
           "best": plan.best.row() if plan.best else None,
           "validation": plan.validation.row() if plan.validation else None,
           "pareto": [p.row() for p in pareto(plan.tried)], "tried": [p.row() for p in plan.tried],
           "wall_s": round(wall, 1)}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    if plan.best is not None:
        out.with_suffix(".toml").write_text(config_toml(plan.best, space.engines_per_machine, slo))
    write_png(plan, str(out.with_suffix(".png")))
