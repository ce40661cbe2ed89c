"""The timing profile's two fixed costs: ``overhead_s`` every step, ``request_overhead_s`` once per request
(charged to the step that admits it); a profile without the latter times exactly as before."""

from __future__ import annotations

import dataclasses

from kvmesh.index.hashing import block_keys, root_seed
from kvmesh.sim import EngineCore, get_profile
from kvmesh.sim.core import SimRequest

SEED = root_seed("kvmesh")


def step_durations(request_overhead_s: float, prompts: list[list[int]], max_tokens: int = 3) -> list[float]:
    """Durations of every step while ``prompts`` (added together) run to completion."""
    prof = dataclasses.replace(get_profile("cpu-demo-small"), request_overhead_s=request_overhead_s)
    core = EngineCore("e0", prof, block_size=16)
    for i, toks in enumerate(prompts):
        core.add(SimRequest(i, toks, list(block_keys(toks, 16, SEED)), max_tokens, 0.0))
    t, out = 0.0, []
    while core.has_work():
        d = core.step(t, horizon=t).duration
        out.append(d)
        t += d
    return out


def test_request_overhead_is_charged_once_per_request_to_the_admitting_step() -> None:
    prompts = [list(range(100)), list(range(1000, 1300))]
    base = step_durations(0.0, prompts)
    charged = step_durations(0.25, prompts)
    assert len(base) == len(charged) == 3  # one prefill step admits both, then two decode steps
    assert abs(charged[0] - base[0] - 2 * 0.25) < 1e-12
    assert charged[1:] == base[1:]


def test_a_zero_request_overhead_times_as_the_profile_always_did() -> None:
    prof = get_profile("cpu-demo-small")
    assert prof.request_overhead_s == 0.0
    toks = list(range(200))
    [first, *_] = step_durations(0.0, [toks], max_tokens=1)
    attn = 200 * (0 + 200 / 2)
    assert first == prof.step_seconds(200, attn, 0, 0)
