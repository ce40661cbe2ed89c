"""``kvmesh sim`` and ``kvmesh calibrate``: typer commands over :mod:`kvmesh.sim` (registered by ``kvmesh.cli``)."""

from __future__ import annotations

import pathlib
from typing import Annotated

import typer

from kvmesh.cli_options import fail as _fail
from kvmesh.policy_names import policy_help


def register(app: typer.Typer) -> None:
    app.command()(sim)
    app.command()(calibrate)


def sim(
    trace: Annotated[pathlib.Path, typer.Option(help="Trace file (or a directory of Weka conversations)")],
    trace_format: Annotated[str, typer.Option(help="mooncake, azure or weka")] = "mooncake",
    replicas: int = 8,
    policy: Annotated[list[str] | None, typer.Option(help="Policy to simulate (repeat); default: all + oracle "
                                                          "(sees every cache exactly) — " + policy_help())] = None,
    profile: Annotated[str, typer.Option(help="Timing profile: h100-llama3-8b or cpu-demo-small")] = "h100-llama3-8b",
    tokens_per_block: Annotated[int, typer.Option(help="Simulated tokens per 512-token trace block")] = 16,
    limit: Annotated[int | None, typer.Option(help="Only the first N requests")] = None,
) -> None:
    """Virtual-time simulation of N engines under kvmesh's real routing policies and KV index."""
    from kvmesh.sim.runner import DEFAULT_POLICIES, markdown, run_mooncake
    from kvmesh.workloads import TraceError

    if replicas < 1 or tokens_per_block < 1:
        _fail("--replicas and --tokens-per-block must be >= 1")
    try:
        run = run_mooncake(trace, replicas, tuple(policy or DEFAULT_POLICIES), profile, tokens_per_block, limit,
                           fmt=trace_format)
    except (TraceError, ValueError) as e:
        _fail(str(e))
    typer.echo(markdown(run))


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
               f"overhead {prof.overhead_s * 1000:.1f} ms, decode {prof.decode_s_per_seq * 1000:.1f} ms/seq -> {out}\n"
               f"use it with: kvmesh engine --kind sim --profile {out} ...")
