"""``kvmesh top``: a typer command over :mod:`kvmesh.observability.top` (registered by ``kvmesh.cli``)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command()(top)


def top(
    url: Annotated[str, typer.Option(help="The gateway's base URL")] = "http://127.0.0.1:8000",
    cache: Annotated[list[str] | None, typer.Option(help="A cache node's HTTP base URL (its /status); repeat")]
    = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes")] = 2.0,
    once: Annotated[bool, typer.Option(help="Print one frame (totals since start) and exit")] = False,
    api_key: Annotated[str | None, typer.Option(envvar="KVMESH_API_KEY", help="The gateway's admin key, when "
                                                "API keys are on (/health lists backends only for it)")] = None,
) -> None:
    """Live view of one gateway: backends (health, breaker, load, KV usage, hit rate, TTFT), cache tiers,
    top tenants.  Reads /health and /metrics; Ctrl-C quits."""
    from rich.console import Console

    from kvmesh.cli_options import fail
    from kvmesh.observability.top import run

    if not url.startswith(("http://", "https://")):
        fail("--url must start with http(s)://")
    if interval <= 0:
        fail("--interval must be > 0")
    try:
        run(url, cache or [], interval, once, Console(), api_key)
    except KeyboardInterrupt:
        pass
