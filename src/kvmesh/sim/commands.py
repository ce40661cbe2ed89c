"""``kvmesh sim``, ``kvmesh plan`` and ``kvmesh calibrate``: typer commands over :mod:`kvmesh.sim` (registered by
``kvmesh.cli``)."""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING, Annotated

import typer

from kvmesh.cli_options import fail as _fail
from kvmesh.policy_names import policy_help

if TYPE_CHECKING:
    from kvmesh.routing.disagg import Role
    from kvmesh.sim.runner import TraceRun
    from kvmesh.workloads import TraceRequest


def register(app: typer.Typer) -> None:
    app.command()(sim)
    app.command()(plan)
    app.command()(calibrate)


def sim(
    trace: Annotated[pathlib.Path, typer.Option(help="Trace file (or a directory of Weka conversations)")],
    trace_format: Annotated[str, typer.Option(help="mooncake, azure or weka")] = "mooncake",
    replicas: Annotated[int | None, typer.Option(help="Engines (default 8, or prefill + decode)")] = None,
    prefill: Annotated[int, typer.Option(help="Prefill-role engines (P/D disaggregation, with --decode)")] = 0,
    decode: Annotated[int, typer.Option(help="Decode-role engines (P/D disaggregation, with --prefill)")] = 0,
    policy: Annotated[list[str] | None, typer.Option(help="Policy to simulate (repeat); default: all + oracle "
                                                          "(sees every cache exactly) — " + policy_help())] = None,
    profile: Annotated[str, typer.Option(help="Timing profile: h100-llama3-8b or cpu-demo-small")] = "h100-llama3-8b",
    tokens_per_block: Annotated[int, typer.Option(help="Simulated tokens per 512-token trace block")] = 16,
    limit: Annotated[int | None, typer.Option(help="Only the first N requests")] = None,
) -> None:
    """Virtual-time simulation of N engines under kvmesh's real routing policies and KV index."""
    from kvmesh.sim.profiles import get_profile
    from kvmesh.sim.runner import DEFAULT_POLICIES, markdown
    from kvmesh.workloads import TraceError, load_trace

    roles = _roles(replicas, prefill, decode)
    replicas = len(roles) if roles else replicas or 8
    if replicas < 1 or tokens_per_block < 1:
        _fail("--replicas and --tokens-per-block must be >= 1")
    try:
        reqs = load_trace(trace, trace_format, limit)
        prof = get_profile(profile)
        typer.echo(f"simulating {len(reqs)} requests of {trace} ({trace_format}) on {replicas} replicas, timing "
                   f"profile {prof.name}" + (f" (from {profile})" if profile != prof.name else ""))
        run = _simulate(reqs, replicas, tuple(policy or DEFAULT_POLICIES), profile, tokens_per_block, roles)
    except (TraceError, ValueError) as e:
        _fail(str(e))
    typer.echo(markdown(run))
    if roles:
        typer.echo(pd_summary(run, f"{prefill}P{decode}D"))


def _roles(replicas: int | None, prefill: int, decode: int) -> list[Role] | None:
    """Each engine's P/D role (prefill ones first), or None for an aggregated fleet."""
    if not prefill and not decode:
        return None
    if prefill < 1 or decode < 1 or (replicas is not None and replicas != prefill + decode):
        _fail("P/D needs --prefill >= 1 and --decode >= 1 (and --replicas, if given, equal to their sum)")
    p: list[Role] = ["prefill"]
    d: list[Role] = ["decode"]
    return p * prefill + d * decode


def pd_summary(run: TraceRun, label: str) -> str:
    """One line per policy: remote vs local prefills (by reason), the KV moved, each role's busy share."""
    lines = [f"\nP/D {label}:"]
    for r in run.results:
        pd = r.pd
        local = ", ".join(f"{k} {v}" for k, v in pd["local_by_reason"].items()) or "none"
        busy = ", ".join(f"{k} {v['busy_share']:.0%}" for k, v in pd["roles"].items())
        lines.append(f"- {r.policy}: remote prefills {pd['remote_prefills']}, local {pd['local_prefills']} "
                     f"({local}); KV moved {pd['transfer_bytes'] / 1e9:.1f} GB at {pd['kv_transfer_gbps']:g} GB/s, "
                     f"transfer mean {pd['transfer_mean_s'] * 1000:.1f} ms (p99 {pd['transfer_p99_s'] * 1000:.1f} ms, "
                     f"not overlapped with prefill); busy {busy}")
    return "\n".join(lines)


def _simulate(reqs: list[TraceRequest], replicas: int, policies: tuple[str, ...], profile: str,
              tokens_per_block: int, roles: list[Role] | None = None) -> TraceRun:
    """One policy at a time, so a bar (on stderr, when it is a terminal) shows which one runs and how many are
    left; the results are those of :func:`kvmesh.sim.runner.run_requests` over all of them."""
    import dataclasses
    import sys

    from rich.console import Console
    from rich.progress import Progress, TimeElapsedColumn

    from kvmesh.sim.runner import run_requests

    runs = []
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), console=Console(stderr=True),
                  disable=not sys.stderr.isatty(), transient=True) as bar:
        task = bar.add_task("simulating", total=len(policies))
        for name in policies:
            bar.update(task, description=f"policy {name}")
            runs.append(run_requests(reqs, replicas, (name,), profile, tokens_per_block, roles=roles))
            bar.advance(task)
    return dataclasses.replace(runs[0], results=[r.results[0] for r in runs])


def plan(
    trace: Annotated[pathlib.Path, typer.Option(help="Trace file (or a directory of Weka conversations)")],
    trace_format: Annotated[str, typer.Option("--format", help="mooncake, azure or weka")] = "mooncake",
    profile: Annotated[str, typer.Option(help="Timing profile: h100-llama3-8b or cpu-demo-small")] = "h100-llama3-8b",
    slo: Annotated[str, typer.Option(help="Targets, e.g. ttft_p90=2s,tpot_p90=50ms")] = "ttft_p90=2s,tpot_p90=50ms",
    max_replicas: int = 64,
    per_machine: Annotated[int, typer.Option(help="Engines (GPUs) per machine")] = 8,
    policy: Annotated[list[str] | None, typer.Option(help="Routing policies to try (repeat); default kv-aware and "
                                                          "least-request")] = None,
    dram_gb: Annotated[str, typer.Option(help="DRAM tier sizes per machine to try, GB")] = "0,1000",
    ssd_gb: Annotated[str, typer.Option(help="SSD tier sizes per machine to try, GB")] = "0,8000",
    gpu_hour: Annotated[float, typer.Option(help="$ per GPU-hour")] = 2.5,
    dram_gb_hour: Annotated[float, typer.Option(help="$ per GB-hour of DRAM")] = 0.004,
    ssd_gb_hour: Annotated[float, typer.Option(help="$ per GB-hour of SSD")] = 0.0001,
    budget: Annotated[float | None, typer.Option(help="At most this many $ per hour")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N requests of the trace")] = None,
    out: Annotated[pathlib.Path | None, typer.Option(help="Write PATH.json, PATH.toml (kvmesh config for the "
                                                          "winner) and PATH.png (Pareto front)")] = None,
) -> None:
    """Cheapest replicas x DRAM/SSD x pooling x policy meeting the SLO, searched with the simulator on the first
    half of the trace and re-checked on the held-back second half."""
    from kvmesh.sim.plan import PlanSpace, Prices, SloSpec
    from kvmesh.sim.plan_run import run_plan
    from kvmesh.workloads import TraceError

    try:
        space = PlanSpace(tuple(policy or ("kv-aware", "least-request")), _ints(dram_gb), _ints(ssd_gb),
                          max_replicas=max_replicas, engines_per_machine=per_machine, budget=budget)
        text = run_plan(trace, trace_format, SloSpec.parse(slo), space, Prices(gpu_hour, dram_gb_hour, ssd_gb_hour),
                        profile, limit, out, typer.echo)
    except (TraceError, ValueError) as e:
        _fail(str(e))
    typer.echo(text)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def calibrate(
    url: Annotated[str, typer.Option(help="A running engine (vLLM or any OpenAI-compatible server)")],
    model: Annotated[str, typer.Option(help="Served model name")] = "kvmesh-demo",
    base: Annotated[str, typer.Option(help="Profile whose other fields (capacity, batch) are kept")] = "cpu-demo-small",
    out: Annotated[pathlib.Path, typer.Option(help="Where to write the fitted profile (JSON)")] = pathlib.Path(
        "profile.json"),
) -> None:
    """Measure an engine's prefill and decode costs and write a timing profile for simulated engines."""
    import httpx

    from kvmesh.sim.calibrate import calibrate as fit
    from kvmesh.sim.calibrate import save_profile
    from kvmesh.sim.profiles import get_profile

    try:
        prof = fit(url.rstrip("/"), model, get_profile(base))
    except ValueError as e:
        _fail(str(e))
    except httpx.HTTPError as e:
        _fail(f"cannot measure {url}: {type(e).__name__}: {e}", 1)
    save_profile(prof, out)
    typer.echo(f"prefill {prof.prefill_tps:,.0f} tok/s, attention {prof.attn_s_per_token2:.2e} s/tok², step "
               f"overhead {prof.overhead_s * 1000:.1f} ms, per request {prof.request_overhead_s * 1000:.1f} ms, "
               f"decode {prof.decode_s_per_seq * 1000:.1f} ms/seq -> {out}\n"
               f"use it with: kvmesh engine --kind sim --profile {out} ...")
