"""The engine model shared by the virtual-time simulator: continuous batching over a prefix-cached block pool.

One ``step()`` is one engine iteration, as vLLM v1 schedules it: every running request that finished its
prefill decodes one token; the remaining token budget goes to prefill chunks, first of requests already
running (chunked prefill), then of waiting requests admitted in arrival order while blocks and batch slots
last.  Admission looks up the request's cached prefix (full blocks only; the last prompt token is always
computed).  The step's duration comes from a :class:`TimingProfile`.

With ``tier`` set (a :class:`kvmesh.sim.tiers.MachineView`), admission continues the GPU prefix through the
machine's cache tiers: those blocks are loaded, not computed, and every computed block is saved to the tiers.
As kvmesh's connector does by default (``async_loads``): the request holds its blocks and waits out its load
time aside (vLLM's ``WAITING_FOR_REMOTE_KVS``), joining the running batch at the first step that starts after
the load is done, and the steps do not wait for saves (a save thread copies them).  With a synchronous
connector, the load time is added to the admitting step (loads before the forward pass) and the copy of the
blocks the tiers did not hold yet to the step that computed them (``wait_for_save`` before the step returns).

Token scale: a simulated *prompt* token may stand for ``token_scale`` real tokens (traces scaled down so
that millions of tokens stay cheap); timing uses real tokens, the block pool and events use simulated ones.
Generated tokens are not scaled — a request asks for its real output length — so each is one real token:
of decode context, and 1/``token_scale`` of a simulated token's KV slot (:meth:`EngineCore.slots`).
(Counting each as ``token_scale`` real tokens, as this engine once did, gave a Mooncake request at scale 32
~11k phantom tokens of decode context and KV beside its ~12k prompt.)
Not thread-safe; driven by one caller.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kvmesh.sim.blockpool import BlockPool
from kvmesh.sim.profiles import TimingProfile


class TierAccess(Protocol):
    """An engine's view of the cache tiers below its GPU (``kvmesh.sim.tiers.MachineView``)."""

    def held(self, keys: Sequence[int]) -> int: ...
    def load(self, keys: Sequence[int]) -> float: ...
    def save(self, key: int, parent: int | None, tokens: list[int]) -> bool: ...
    def save_seconds(self, blocks: int) -> float: ...
    def step_seconds(self, compute_s: float, load_s: float) -> float: ...
    @property
    def async_loads(self) -> bool: ...


@dataclass(slots=True, eq=False)
class SimRequest:
    rid: int
    tokens: list[int]
    keys: list[int]          # chained keys of the prompt's full blocks
    max_tokens: int
    arrival: float
    engine: str = ""
    cached: int = 0          # prompt tokens found in the cache at admission
    loaded: int = 0          # of those, tokens loaded from the tiers below the GPU
    computed: int = 0        # prompt tokens cached or computed so far
    generated: int = 0
    held: list[int] = field(default_factory=list)   # cached block keys this request references
    extra_blocks: int = 0    # blocks allocated that are not (yet) cached
    first_token_at: float = -1.0
    done_at: float = -1.0
    salt: str | None = None  # cache_salt: published with the first block, as vLLM does
    session: str | None = None  # the conversation it belongs to (routing sees it as x-session-id)
    remote_kv: bool = False  # its prompt's KV was prefilled on another engine and transferred here
    transferred: int = 0     # prompt tokens whose KV arrived by transfer rather than from this engine's cache
    load_wait_s: float = 0.0  # an async tier load: how long it waits aside before it can run

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens)


@dataclass(slots=True)
class StepResult:
    duration: float
    first_tokens: list[SimRequest]
    finished: list[SimRequest]


class EngineCore:
    def __init__(self, name: str, profile: TimingProfile, block_size: int, token_scale: float = 1.0) -> None:
        self.name = name
        self.profile = profile
        self.block_size = block_size
        self.scale = token_scale
        blocks = int(profile.kv_capacity_tokens / token_scale) // block_size
        self.pool = BlockPool(blocks, block_size)
        self.budget = max(1, int(profile.max_batch_tokens / token_scale))
        self.waiting: collections.deque[SimRequest] = collections.deque()
        self.running: list[SimRequest] = []
        self.loading: list[tuple[float, SimRequest]] = []  # (ready at, request): async tier loads in flight
        self.tier: TierAccess | None = None
        self.tier_hits = 0       # prompt tokens loaded from the tiers
        self.received = 0        # prompt tokens whose KV arrived from a prefill engine
        self._load_s = 0.0       # load time of this step's admissions
        self._tier_load_s = 0.0  # of which: loads from the cache tiers
        self._save_blocks = 0    # blocks this step copies out to the tiers

    def add(self, req: SimRequest) -> None:
        req.engine = self.name
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def _admitted(self) -> list[SimRequest]:
        return self.running + [r for _, r in self.loading]

    def queued_prefill_tokens(self) -> int:
        """Prompt tokens still to compute on this engine (for the oracle; an estimate for waiting ones)."""
        return sum(len(r.tokens) - r.computed for r in self._admitted()) + sum(len(r.tokens) for r in self.waiting)

    def context_tokens(self) -> int:
        """Context tokens (prompt + generated so far) of every request admitted or waiting here."""
        return sum(self.slots(r) for r in self._admitted()) + sum(len(r.tokens) for r in self.waiting)

    def slots(self, r: SimRequest) -> int:
        """Simulated token slots ``r``'s KV fills: its prompt's, and one per ``token_scale`` generated tokens."""
        return len(r.tokens) + math.ceil(r.generated / self.scale)

    def _real_context(self, reqs: Sequence[SimRequest]) -> int:
        """Real context tokens of ``reqs``, as the timing profile reads them (prompt scaled, output not)."""
        return int(sum(len(r.tokens) * self.scale + r.generated for r in reqs))

    # ---- one iteration ---------------------------------------------------------------------------
    def step(self, now: float, horizon: float = math.inf) -> StepResult:
        """Plan and account one iteration starting at ``now``; with only decodes left and nothing due
        before ``horizon``, several decode iterations are fast-forwarded at once."""
        if self.loading:
            self._ready(now)
            if not self.running and not self.waiting:  # only loads in flight: wait for the first (or news)
                wait = min(t for t, _ in self.loading) - now
                return StepResult(max(min(wait, horizon - now), 1e-3), [], [])
        if not self.waiting and self.running and not self.loading and not any(r.prefilling for r in self.running):
            return self._decode_run(now, horizon)
        decodes = [r for r in self.running if not r.prefilling]
        for r in decodes:
            self._grow(r)
        budget = self.budget - len(decodes)
        chunks: list[tuple[SimRequest, int]] = []
        for r in self.running:
            if r.prefilling and budget > 0:
                n = min(len(r.tokens) - r.computed, budget)
                chunks.append((r, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.profile.max_running:
            if not self._admit(self.waiting[0]):
                break
            r = self.waiting.popleft()
            if r.load_wait_s > 0:  # its blocks are held; it runs once the load is done
                self.loading.append((now + r.load_wait_s, r))
                continue
            self.running.append(r)
            n = min(len(r.tokens) - r.computed, budget)
            chunks.append((r, n))
            budget -= n
        return self._finish_step(now, decodes, chunks)

    def _finish_step(self, now: float, decodes: list[SimRequest], chunks: list[tuple[SimRequest, int]]) -> StepResult:
        attn = sum(n * (r.computed + n / 2) for r, n in chunks)
        s = self.scale
        dur = self.profile.step_seconds(int(sum(n for _, n in chunks) * s), attn * s * s, len(decodes),
                                        self._real_context(decodes))
        for r, n in chunks:
            self._compute(r, n)  # counts the blocks this step saves
        if self._save_blocks and self.tier is not None:
            dur += self.tier.save_seconds(self._save_blocks)
        other = self._load_s - self._tier_load_s
        if self.tier is not None:
            dur = self.tier.step_seconds(dur, self._tier_load_s)
        dur, self._load_s, self._tier_load_s, self._save_blocks = dur + other, 0.0, 0.0, 0
        end = now + dur
        firsts: list[SimRequest] = []
        for r, _ in chunks:
            if not r.prefilling:
                r.generated = 1
                r.first_token_at = end
                firsts.append(r)
        for r in decodes:
            r.generated += 1
        return StepResult(dur, firsts, self._reap(end))

    def _ready(self, now: float) -> None:
        """Loads done by ``now`` join the running batch (vLLM schedules them at the next step)."""
        done = [r for t, r in self.loading if t <= now]
        if done:
            self.loading = [(t, r) for t, r in self.loading if t > now]
            self.running += done

    def _decode_run(self, now: float, horizon: float) -> StepResult:
        """k decode iterations in one go (no prefill pending): until the first request finishes, a new
        block is needed, or ``horizon`` (the next outside event) is reached."""
        step = self.profile.step_seconds(0, 0.0, len(self.running), self._real_context(self.running))
        k = min(r.max_tokens - r.generated for r in self.running)
        k = min(k, min(self._fits(r) for r in self.running))
        if horizon < math.inf:
            k = min(k, max(1, int((horizon - now) / step)))
        k = max(1, k)
        for r in self.running:
            self._grow(r)
            r.generated += k
        dur = step * k + self.profile.decode_s_per_ctx_token * len(self.running) * k * (k - 1) / 2  # +1 real each
        return StepResult(dur, [], self._reap(now + dur))

    def abort(self, req: SimRequest) -> None:
        """Drop a request (client gone); its blocks are released like a finished request's."""
        if req in self.waiting:
            self.waiting.remove(req)
            return
        if any(r is req for _, r in self.loading):
            self.loading = [(t, r) for t, r in self.loading if r is not req]
            self.pool.release(req.held, req.extra_blocks)
            return
        if any(r is req for r in self.running):
            self.running = [r for r in self.running if r is not req]
            self.pool.release(req.held, req.extra_blocks)

    def reset_prefix_cache(self) -> bool:
        """Forget every unreferenced cached block (vLLM's ``/reset_prefix_cache``); False while requests
        hold blocks, as vLLM refuses then."""
        if self.running or self.loading:
            return False
        self.pool.clear()
        return True

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _admit(self, r: SimRequest) -> bool:
        bs = self.block_size
        hit = self.pool.cached_prefix(r.keys)
        if hit * bs >= len(r.tokens):  # always compute the last token
            hit -= 1
        need = math.ceil((len(r.tokens) - hit * bs) / bs)
        if not self.pool.can_allocate(need):
            return False
        r.held = list(r.keys[:hit])
        self.pool.acquire_prefix(r.held)
        self.pool.allocate(need)
        r.extra_blocks = need
        r.cached = r.computed = hit * bs
        self._load_s += self.profile.request_overhead_s  # per-request engine work, in the admitting step
        self.pool.queries += len(r.tokens)
        self.pool.hits += r.cached
        if r.remote_kv:
            self._receive(r, hit, (len(r.tokens) - 1) // bs)
        elif self.tier is not None:
            self._load(self.tier, r, hit, (len(r.tokens) - 1) // bs)
        return True

    def _receive(self, r: SimRequest, hit: int, full: int) -> None:
        """The transferred KV fills the blocks after this engine's own cached prefix, up to the last prompt
        token (computed here, as vLLM's decode side does)."""
        bs = self.block_size
        for i in range(hit, full):
            extra = [(r.salt,)] if i == 0 and r.salt else None
            self.pool.store(r.keys[i], r.keys[i - 1] if i else None, r.tokens[i * bs:(i + 1) * bs], extra)
            r.held.append(r.keys[i])
            r.extra_blocks -= 1
        r.computed = len(r.tokens) - 1
        r.transferred = r.computed - r.cached
        self.received += r.transferred

    def _load(self, tier: TierAccess, r: SimRequest, hit: int, full: int) -> None:
        """Load the blocks after the GPU prefix that the tiers hold; they become cached GPU blocks."""
        n = tier.held(r.keys[hit:full]) if hit < full else 0
        if not n:
            return
        took = tier.load(r.keys[hit:hit + n])
        if tier.async_loads:
            r.load_wait_s = took
        else:
            self._load_s += took
            self._tier_load_s += took
        bs = self.block_size
        for i in range(hit, hit + n):
            extra = [(r.salt,)] if i == 0 and r.salt else None
            self.pool.store(r.keys[i], r.keys[i - 1] if i else None, r.tokens[i * bs:(i + 1) * bs], extra)
            r.held.append(r.keys[i])
            r.extra_blocks -= 1
        r.loaded = n * bs
        r.cached = r.computed = (hit + n) * bs
        self.tier_hits += r.loaded

    def _compute(self, r: SimRequest, n: int) -> None:
        bs = self.block_size
        before = r.computed // bs
        r.computed += n
        for i in range(before, min(r.computed // bs, len(r.keys))):
            parent = r.keys[i - 1] if i else None
            extra = [(r.salt,)] if i == 0 and r.salt else None
            self.pool.store(r.keys[i], parent, r.tokens[i * bs:(i + 1) * bs], extra)
            if self.tier is not None:
                self._save_blocks += self.tier.save(r.keys[i], parent, r.tokens[i * bs:(i + 1) * bs])
            r.held.append(r.keys[i])
            r.extra_blocks -= 1

    def _grow(self, r: SimRequest) -> None:
        # a decode token that starts a new slot at a block boundary needs one more (uncached) block
        before = self.slots(r)
        if before % self.block_size == 0 and math.ceil((r.generated + 1) / self.scale) > before - len(r.tokens) \
                and self.pool.allocate(1):
            r.extra_blocks += 1

    def _fits(self, r: SimRequest) -> int:
        """Tokens ``r`` can generate from now on in the blocks it holds once :meth:`_grow` gave its next token
        one (at scale 1: up to the next block boundary)."""
        bs = self.block_size
        after = len(r.tokens) + math.ceil((r.generated + 1) / self.scale)
        capacity = -(-after // bs) * bs
        return max(1, math.floor((capacity - len(r.tokens)) * self.scale) - r.generated)

    def _reap(self, end: float) -> list[SimRequest]:
        done = [r for r in self.running if not r.prefilling and r.generated >= r.max_tokens]
        if done:
            self.running = [r for r in self.running if r.prefilling or r.generated < r.max_tokens]
            for r in done:
                r.done_at = end
                self.pool.release(r.held, r.extra_blocks)
        return done
