"""``kvmesh bench run`` and ``kvmesh bench compare``: typer commands over :mod:`kvmesh.bench` (registered by
``kvmesh.cli``).

Outputs go to ``--out``, by default a fresh ``run/bench/<command>-<time>/`` directory beside the stacks' run
directories (which git ignores): a benchmark never writes into the current directory itself, and a second run
never overwrites the first.  Progress bars draw on stderr only when it is a terminal.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import time
from typing import Annotated

import typer

from kvmesh.cli_options import fail as _fail

bench_app = typer.Typer(no_args_is_help=True, help="Load generation and router comparisons.")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("run")
def bench_run(
    url: Annotated[str, typer.Option(help="Gateway or engine base URL")] = "http://127.0.0.1:8000",
    model: str = "kvmesh-demo",
    trace: Annotated[pathlib.Path | None, typer.Option(help="Trace file/dir (replaces --workload)")] = None,
    trace_format: Annotated[str, typer.Option(help="mooncake, azure or weka")] = "mooncake",
    workload: Annotated[str, typer.Option(help="Without --trace: groups (shared-prefix groups) or chat "
                                               "(multi-turn sessions)")] = "groups",
    limit: Annotated[int, typer.Option(help="Requests to send")] = 200,
    turns: Annotated[int, typer.Option(help="Turns per chat session (--workload chat)")] = 4,
    mode: Annotated[str, typer.Option(help="trace (timestamps), poisson, closed")] = "trace",
    speedup: float = 1.0,
    rate: Annotated[float, typer.Option(help="Requests/s (poisson)")] = 2.0,
    concurrency: Annotated[int, typer.Option(help="Clients (closed)")] = 8,
    max_tokens: Annotated[int, typer.Option(help="Cap on output tokens per request")] = 64,
    slo_ttft: float = 2.0,
    slo_tpot: float = 0.2,
    api_key: Annotated[str | None, typer.Option(help="Bearer key (tenants)")] = None,
    out: Annotated[pathlib.Path | None, typer.Option(help="Directory for requests.jsonl, summary, plots "
                                                          "[default: run/bench/run-<time>]")] = None,
) -> None:
    """Replay a workload against an OpenAI-compatible URL; report TTFT/TPOT/E2E, goodput, hit rate."""
    from kvmesh.bench.loadgen import LoadSpec, markdown, run_load, summarize, write_outputs
    from kvmesh.workloads import TraceError, load_trace, multi_turn_chat, shared_prefix_groups

    if mode not in ("trace", "poisson", "closed"):
        _fail("--mode must be trace, poisson or closed")
    if workload not in ("groups", "chat"):
        _fail("--workload must be groups or chat")
    if limit < 1 or speedup <= 0 or rate <= 0 or concurrency < 1 or turns < 1:
        _fail("--limit, --speedup, --rate, --concurrency and --turns must be positive")
    try:
        if trace:
            reqs = load_trace(trace, trace_format, limit)
        elif workload == "chat":
            reqs = multi_turn_chat(-(-limit // turns), turns, rate=rate)[:limit]
        else:
            reqs = shared_prefix_groups(max(1, limit // 8), 8)[:limit]
    except TraceError as e:
        _fail(str(e))
    spec = LoadSpec(url.rstrip("/"), model, mode, speedup, rate, concurrency, max_tokens, slo_ttft, slo_tpot,
                    headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    t0 = time.perf_counter()
    results = asyncio.run(run_load(spec, reqs, progress=sys.stderr.isatty()))
    summary = summarize(results, spec, time.perf_counter() - t0)
    summary["workload"] = {"trace": str(trace) if trace else None, "trace_format": trace_format if trace else None,
                           "workload": None if trace else workload, "limit": limit, "turns": turns, "mode": mode,
                           "speedup": speedup, "rate": rate, "concurrency": concurrency, "max_tokens": max_tokens,
                           "slo_ttft_s": slo_ttft, "slo_tpot_s": slo_tpot, "url": url, "model": model}
    if not summary["ok"]:  # a table of NaNs would look like a result: nothing answered, say so and fail
        errors = summary["errors"]
        _fail(f"no request to {url} succeeded ({len(results)} sent; {max(errors, key=errors.get, default='?')})", 1)
    files = write_outputs(out or default_out("run"), results, summary)
    typer.echo(markdown(summary))
    typer.echo("wrote " + ", ".join(str(f) for f in files))


def default_out(command: str) -> pathlib.Path:
    """``run/bench/<command>-<local time>``, suffixed ``-2``, ``-3``... when a run in the same second took it."""
    from kvmesh.config import SupervisorConfig

    base = pathlib.Path(SupervisorConfig().run_dir) / "bench" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _plot_path(out: pathlib.Path) -> pathlib.Path | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return out / "compare.png"


@bench_app.command("compare")
def bench_compare(
    trace: Annotated[pathlib.Path | None, typer.Option(help="Mooncake-format trace (--workload mooncake)")] = None,
    workload: Annotated[str, typer.Option(help="mooncake (the trace) or chat (generated multi-turn sessions)")] = (
        "mooncake"),
    requests: int = 400,
    speedup: Annotated[float, typer.Option(help="Simulated engines run this much faster than real time")] = 4.0,
    load: Annotated[float, typer.Option(help="Arrivals this much denser than the trace's")] = 1.0,
    routers: Annotated[str, typer.Option(help="Comma-separated: kvmesh-<policy>, sglang-<policy>, "
                                              "vllm-router-<policy>")] = "",
    repeats: Annotated[int, typer.Option(min=1, help="Run the routers this many times, interleaved: means, "
                                                     "with each run's TTFT and paired ratios kept")] = 1,
    out: Annotated[pathlib.Path | None, typer.Option(help="Directory for compare.json, the TTFT CDF plot "
                                                          "(compare.png) and the routers' logs "
                                                          "[default: run/bench/compare-<time>]")] = None,
) -> None:
    """The same trace through several routers over the SAME 8 simulated engines (caches reset between)."""
    import json

    from kvmesh.bench.compare import DEFAULT_ROUTERS, CompareArgs, compare, print_table
    from kvmesh.config import StackConfig
    from kvmesh.models import demo
    from kvmesh.workloads import TraceError

    out = out or default_out("compare")
    model_dir = pathlib.Path(StackConfig().models_dir) / "demo-tiny"  # where `kvmesh up --model-size tiny` puts it
    if not demo.is_complete(model_dir):
        demo.generate("tiny", model_dir)
    try:
        args = CompareArgs(requests, speedup, load, routers or DEFAULT_ROUTERS, workload, _plot_path(out),
                           repeats=repeats)
        m = compare(trace, model_dir, out, args)
    except TraceError as e:
        _fail(str(e))
    (out / "compare.json").write_text(json.dumps(m, indent=2) + "\n")
    print_table(m)
    typer.echo(f"wrote {out / 'compare.json'}" + (f", {args.plot}" if args.plot else "") + f" (logs in {out})")
