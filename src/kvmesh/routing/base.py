"""The routing interface.

A :class:`Policy` is a pipeline: every :class:`CandidateFilter` narrows the list of backends, every
:class:`Scorer` gives each survivor a cost (lower is better; a policy sums them with weights), and the
:class:`Picker` chooses among the scored candidates.  Policies are synchronous and must not block or do
I/O: they run on the gateway's event loop for every request, and whatever they need (index lookups, load
figures) is kept up to date by other tasks and read here.  A policy never raises for a request it cannot
place except :class:`NoCandidate`, which the gateway turns into a 503.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvmesh.index.index import KvIndex


@dataclass(slots=True)
class RequestContext:
    """What a policy may know about a request.  ``token_ids`` is filled when the gateway tokenised it."""

    request_id: str
    model: str
    endpoint: str
    prompt_tokens_estimate: int = 0
    max_tokens: int | None = None
    token_ids: Sequence[int] | None = None  # all the prompt's ids, or (tokenised lazily) a prefix of them
    session_id: str | None = None
    tenant: str | None = None
    # Cut by the gateway's tokenise stage at the policy's :meth:`Policy.key_spec`; None when not known yet.
    block_keys: Sequence[int] | None = None


class Candidate(Protocol):
    """The view of a backend a policy gets (the gateway's ``Backend`` implements it)."""

    @property
    def name(self) -> str: ...
    @property
    def healthy(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def models(self) -> frozenset[str]: ...
    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens routed here whose first token has not come back yet (the gateway's view)."""
    @property
    def engine_queue(self) -> int:
        """Running + waiting requests from the engine's own /metrics when fresh, else -1."""
    @property
    def running(self) -> int:
        """Requests the engine reports running (decoding or prefilling) when fresh, else -1."""
    @property
    def kv_usage(self) -> float:
        """Share (0-1) of the engine's KV blocks held by running requests when fresh, else -1."""


@dataclass(slots=True)
class CandidateState:
    """A plain :class:`Candidate` (for simulations, benchmarks and tests of policies)."""

    name: str
    healthy: bool = True
    in_flight: int = 0
    models: frozenset[str] = frozenset()
    pending_prefill_tokens: int = 0
    engine_queue: int = -1
    running: int = -1
    kv_usage: float = -1.0


@dataclass(slots=True)
class Scores:
    """What a scorer found, one entry per candidate in order: ``costs`` (lower is better); KV-aware scorers
    also say how many prompt tokens each candidate would prefill, which block keys they matched, and — only
    when asked to explain — a breakdown per candidate."""

    costs: list[float]
    prefill_tokens: list[int] | None = None
    block_keys: Sequence[int] | None = None
    explain: list[dict[str, object]] | None = None


@dataclass(slots=True)
class Decision:
    """The policy's answer: the backend, each scorer's cost for it, and what the scorers found out that the
    caller needs next (prefill tokens for load accounting, block keys to record, the explanation)."""

    backend: Candidate
    costs: dict[str, float] = field(default_factory=dict)
    policy: str = ""
    prefill_tokens: int | None = None
    block_keys: Sequence[int] | None = None
    explain: list[dict[str, object]] | None = None


class NoCandidate(Exception):
    """No backend can take this request (none healthy / none serves the model)."""


class CandidateFilter(abc.ABC):
    @abc.abstractmethod
    def filter(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]: ...


class Scorer(abc.ABC):
    name: str = "score"

    @abc.abstractmethod
    def score(self, ctx: RequestContext, cands: list[Candidate], explain: bool = False) -> Scores:
        """One cost per candidate, same order; lower is better.  Never mutates ``ctx``: what it learns goes
        into the returned :class:`Scores`; ``explain`` asks for the per-candidate breakdown (costs extra)."""


class Picker(abc.ABC):
    @abc.abstractmethod
    def pick(self, ctx: RequestContext, cands: list[Candidate], costs: list[float]) -> int:
        """Index of the chosen candidate; ``cands`` is never empty."""


class Policy:
    """A pipeline of filters, weighted scorers and a picker.

    The gateway talks to a policy only through this interface:

    - ``needs_tokens``: tokenise requests for it (else routing sees only ``prompt_tokens_estimate``);
    - :meth:`key_spec`: the block size and hash seed its block keys are cut at, so the tokenise stage can
      cut them next to tokenisation (None: no keys, or block size not known yet);
    - :attr:`event_index`: the KV index it reads, which the gateway feeds with the engines' KV events
      (None: the policy reads none, and no events are subscribed);
    - :meth:`choose`, then ``on_routed`` (committed, before sending), ``on_first_token`` (the backend
      started answering) and ``on_finished`` (the attempt ended, answered or not) to learn from outcomes.
    """

    needs_tokens = False

    def __init__(self, name: str, filters: Sequence[CandidateFilter],
                 scorers: Sequence[tuple[Scorer, float]], picker: Picker) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    @property
    def event_index(self) -> KvIndex | None:
        return None

    def key_spec(self, salt: str | None) -> tuple[int, int] | None:
        """``(block_size, seed)`` for a request of the tenant with cache ``salt``; None when not needed/known."""
        return None

    def holds(self, key: int) -> bool:
        """Whether some engine may hold the block with this key (cached, or routed there and pending).  The
        tokenise stage stops at the first block no engine holds: past it, only the prompt's length matters,
        and ``RequestContext.prompt_tokens_estimate`` carries it.  True by default: tokenise everything."""
        return True

    def on_more_keys(self, ctx: RequestContext, d: Decision, keys: Sequence[int]) -> None:
        """The request's whole key chain (``keys``, of which ``d.block_keys`` is a prefix), computed after it
        was sent to ``d.backend`` when the tokenise stage stopped early."""

    def choose(self, ctx: RequestContext, backends: Sequence[Candidate],
               exclude: frozenset[str] = frozenset(), explain: bool = False) -> Decision:
        cands = [b for b in backends if b.name not in exclude]
        for f in self.filters:
            cands = f.filter(ctx, cands)
        if not cands:
            raise NoCandidate(f"no healthy backend serves model {ctx.model!r}")
        total = [0.0] * len(cands)
        per: dict[str, list[float]] = {}
        found = Scores([])
        for scorer, weight in self.scorers:
            s = scorer.score(ctx, cands, explain)
            per[scorer.name] = s.costs
            total = [t + weight * v for t, v in zip(total, s.costs, strict=True)]
            found.prefill_tokens = s.prefill_tokens or found.prefill_tokens
            found.block_keys = s.block_keys or found.block_keys
            found.explain = s.explain or found.explain
        i = self.picker.pick(ctx, cands, total)
        return Decision(cands[i], {k: v[i] for k, v in per.items()}, self.name,
                        found.prefill_tokens[i] if found.prefill_tokens else None,
                        found.block_keys if found.block_keys is not None else ctx.block_keys, found.explain)

    def on_routed(self, ctx: RequestContext, d: Decision) -> None:
        """Called once the request is committed to ``d.backend`` (before it is sent)."""

    def on_first_token(self, ctx: RequestContext, d: Decision, ttft_s: float, queued_tokens: int) -> None:
        """Called when ``d.backend`` produced its first byte; ``queued_tokens`` were ahead of it at dispatch."""

    def on_finished(self, ctx: RequestContext, d: Decision, decode_s: float, output_tokens: int) -> None:
        """Called once per ``on_routed`` when the attempt on ``d.backend`` ended (answered, failed or cut):
        ``decode_s`` from first to last token and the ``output_tokens`` streamed (0 when none came)."""
