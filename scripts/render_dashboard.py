"""Render a kvmesh Grafana dashboard to a PNG with matplotlib, from the same queries, against a live Prometheus.

Grafana itself does not run here (no Grafana package, no network to fetch one), so this draws what each panel
would: every target of every panel is sent to Prometheus' ``/api/v1/query_range`` with the template variables
at "All" (``kvmesh.observability.dashboards.expand``); time series panels become line charts, stat panels
show each series' last value.  ``docs/observability-overview.png`` was made by ``tests/test_observability.py``
with ``KVMESH_RENDER_OVERVIEW=docs/observability-overview.png`` (which calls :func:`render` while its
Prometheus is up); by hand::

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --out overview.png
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import time
from typing import Any

import httpx

from kvmesh.observability.dashboards import dashboards, expand

Obj = dict[str, Any]


def _legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def _series(prom: str, expr: str, start: float, end: float, step: float) -> list[Obj]:
    r = httpx.get(f"{prom}/api/v1/query_range", timeout=30,
                  params={"query": expand(expr, "10s"), "start": start, "end": end, "step": step})
    body: Obj = r.json()
    return body["data"]["result"] if body.get("status") == "success" else []


def _draw(ax: Any, prom: str, p: Obj, start: float, end: float) -> None:
    ax.set_title(p["title"], fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    lines = []
    for t in p["targets"]:
        for s in _series(prom, t["expr"], start, end, 1.0):
            xs = [float(v[0]) - end for v in s["values"]]
            ys = [float(v[1]) for v in s["values"]]
            lines.append((_legend(t.get("legendFormat", ""), s["metric"]), xs, ys))
    if p["type"] == "stat":
        names = [n for n, _, _ in lines]
        last = [ys[-1] for _, _, ys in lines]
        ax.barh(names, last, color=["tab:green" if v >= 1 else "tab:red" for v in last])
        for i, v in enumerate(last):
            ax.text(v, i, f" {v:g}", va="center", fontsize=7)
        ax.set_xlim(0, max([*last, 1.0]) * 1.3)
        return
    for name, xs, ys in lines:
        ax.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], label=name, linewidth=1.2)
    ax.set_xlabel("seconds ago", fontsize=7)
    if lines:
        ax.legend(fontsize=6, loc="upper left")
    if p["fieldConfig"]["defaults"].get("unit") == "s":
        ax.set_ylabel("seconds", fontsize=7)


def render(prom: str, dashboard: Obj, out: pathlib.Path, span_s: float = 90.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 2.9 * rows), squeeze=False)
    end = time.time()
    for ax, p in zip(axes.flat, panels, strict=False):
        _draw(ax, prom, p, end - span_s, end)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} — rendered from Prometheus by scripts/render_dashboard.py", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prometheus", default="http://127.0.0.1:9090")
    ap.add_argument("--dashboard", default="kvmesh-overview.json", choices=sorted(dashboards()))
    ap.add_argument("--span-s", type=float, default=900.0)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    a = ap.parse_args()
    render(a.prometheus, dashboards()[a.dashboard], a.out, a.span_s)


if __name__ == "__main__":
    main()
