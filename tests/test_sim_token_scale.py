"""Token scale: a simulated prompt token stands for ``token_scale`` real ones, a generated token for one.

A Mooncake request simulated at scale 32 asks for its real output length (mean 343 tokens); counting each
generated token as 32 real ones gave it ~11k phantom tokens of decode context and KV.  These pin the rule
and check that scale 1 times and allocates exactly as a plain engine does.
"""

from __future__ import annotations

from kvmesh.index.hashing import block_keys, root_seed
from kvmesh.sim import EngineCore, get_profile
from kvmesh.sim.core import SimRequest

SEED = root_seed("kvmesh")
BS = 16


def run(scale: float, prompt: int, out: int) -> tuple[EngineCore, SimRequest, list[float], int]:
    """Run one request to its end; (core, request, step durations, most blocks it held at once)."""
    core = EngineCore("e0", get_profile("h100-llama3-8b"), block_size=BS, token_scale=scale)
    toks = list(range(prompt))
    r = SimRequest(0, toks, list(block_keys(toks, BS, SEED)), out, 0.0)
    core.add(r)
    t, steps, most = 0.0, [], 0
    while core.has_work():
        d = core.step(t).duration
        steps.append(d)
        most = max(most, len(r.held) + r.extra_blocks)
        t += d
    return core, r, steps, most


def test_generated_tokens_fill_one_real_token_of_kv_each() -> None:
    core, r, _, most = run(32.0, prompt=BS, out=600)  # one prompt block = 512 real tokens
    assert r.generated == 600
    assert core.slots(r) == BS + 19  # 600 real tokens fill ceil(600 / 32) simulated slots
    # the prompt's block and one opened at slot 32 (as at scale 1, the token that starts a block at a
    # boundary opens it), not one per 16 generated tokens (39 blocks)
    assert most == 2


def test_decode_context_counts_the_prompt_scaled_and_the_output_not() -> None:
    prof = get_profile("h100-llama3-8b")
    _, _, steps, _ = run(32.0, prompt=BS, out=3)
    # after the prefill (which emits token 1), two decode iterations over 512 + 1 and 512 + 2 real tokens
    # (fast-forwarded as one run or not: the same time)
    want = prof.step_seconds(0, 0.0, 1, 512 + 1) + prof.step_seconds(0, 0.0, 1, 512 + 2)
    assert abs(sum(steps[1:]) - want) < 1e-12


def test_scale_one_allocates_a_block_per_block_size_generated_tokens() -> None:
    core, r, _, most = run(1.0, prompt=BS, out=40)
    assert core.slots(r) == BS + 40
    assert most == 1 + 2  # generating positions 17..55 opens the blocks at 32 and 48
