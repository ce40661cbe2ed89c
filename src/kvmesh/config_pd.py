"""``[gateway.pd]``: the prefill/decode disaggregation settings (re-exported by :mod:`kvmesh.config`).

They become a :class:`kvmesh.routing.disagg.PdConfig` (``kvmesh.gateway.pd.plan_config``); the decision
they tune is described there.  Kept in its own module so ``config.py`` stays within the file-size limit.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PdSettings(BaseModel):
    """Prefill/decode disaggregation (see ``kvmesh.routing.disagg``); used when a backend has role prefill,
    or, with ``dynamic``, between ``both`` engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(default=True, description="Prefill long prompts on prefill-role engines")
    min_remote_prefill_tokens: int = Field(default=256, ge=0, description="Uncached prompt tokens on the decode "
                                           "engine below which it prefills itself (a short prompt pays no hop)")
    max_prefill_queue_s: float = Field(default=2.0, ge=0, description="A prefill engine whose estimated queue is "
                                       "longer is saturated: the decode engine prefills instead")
    prefill_timeout_s: float = Field(default=30.0, gt=0, description="A window with no answer and no progress "
                                     "on the prefill engine (hung): the decode engine prefills itself; a busy "
                                     "one is waited on up to the gateway's busy_timeout_s")
    tpot_budget_s: float = Field(default=0.05, gt=0, description="A local prefill stalls the decode engine's "
                                 "running streams when their step, with it and the prefills queued before "
                                 "it, would exceed this")
    ttft_margin_s: float = Field(default=0.5, ge=0, description="TTFT a remote prefill may cost to spare "
                                 "stalled streams, per TPOT budget of stall on a prefill engine without "
                                 "streams (and must save to be taken when nothing stalls)")
    dynamic: bool = Field(default=False, description="Any engine may prefill for another (P/D over a fleet "
                          "of role both)")
    decision: Literal["cost", "threshold"] = Field(default="cost", description="cost: remote prefill when it "
                                                   "spares stalled decode streams within the TTFT margin; "
                                                   "threshold: every prompt past min_remote_prefill_tokens")
    kv_bytes_per_token: float = Field(default=128 * 1024, gt=0, description="KV bytes moved per prompt token "
                                      "(Llama-3-8B bf16: 128 KiB)")
    transfer_gbps: float = Field(default=25.0, gt=0, description="GB/s between a prefill and a decode engine")
    transfer_latency_s: float = Field(default=0.001, ge=0, description="Fixed cost of one KV transfer")
    step_overhead_s: float = Field(default=0.008, ge=0, description="A decode step's fixed cost, added to the "
                                   "fitted per-stream/per-token step when judging a stall (H100: 8 ms)")
