"""kvmesh vs sglang-router vs vllm-router over the same simulated engines (``kvmesh bench compare``).

    make routers && python bench/compare_routers.py --requests 600 --speedup 4 --load 6
    python bench/compare_routers.py --workload chat --requests 480 --name compare_routers_chat

Writes bench/results/NAME.json and NAME.png (TTFT CDF per router).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.common import write_result
from kvmesh.bench.compare import DEFAULT_ROUTERS, CompareArgs, compare
from kvmesh.models import demo

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRACE = ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--speedup", type=float, default=4.0, help="engines run this much faster than real time")
    ap.add_argument("--load", type=float, default=1.0, help="arrivals this much denser than the trace's")
    ap.add_argument("--routers", default=DEFAULT_ROUTERS)
    ap.add_argument("--trace", type=pathlib.Path, default=TRACE)
    ap.add_argument("--workload", choices=("mooncake", "chat"), default="mooncake")
    ap.add_argument("--repeats", type=int, default=1, help="run the routers this many times, interleaved; "
                    "figures are the runs' means, paired per-round ratios kept")
    ap.add_argument("--name", default="compare_routers", help="result name (bench/results/NAME.json)")
    a = ap.parse_args()
    if a.workload == "mooncake" and not a.trace.is_file():
        sys.exit(f"trace not found: {a.trace}")
    model_dir = ROOT / "models" / "demo-tiny"
    if not demo.is_complete(model_dir):
        demo.generate("tiny", model_dir)
    plot = ROOT / "bench" / "results" / f"{a.name}.png"
    args = CompareArgs(a.requests, a.speedup, a.load, a.routers, a.workload, plot, repeats=a.repeats)
    metrics = compare(a.trace, model_dir, ROOT / "run" / "compare", args)
    print(f"wrote {write_result(a.name, metrics)} and {plot}")


if __name__ == "__main__":
    main()
