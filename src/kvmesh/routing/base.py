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
from typing import Protocol


@dataclass(slots=True)
class RequestContext:
    """What a policy may know about a request.  ``token_ids`` is filled when the gateway tokenised it."""

    request_id: str
    model: str
    endpoint: str
    prompt_tokens_estimate: int = 0
    max_tokens: int | None = None
    token_ids: Sequence[int] | None = None
    session_id: str | None = None
    tenant: str | None = None
    # Filled by KV-aware scorers: the request's block keys and, per backend, the tokens it would prefill.
    block_keys: Sequence[int] | None = None
    uncached: dict[str, int] = field(default_factory=dict)
    explain: list[dict[str, object]] | None = None


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


@dataclass(slots=True)
class CandidateState:
    """A plain :class:`Candidate` (for simulations, benchmarks and tests of policies)."""

    name: str
    healthy: bool = True
    in_flight: int = 0
    models: frozenset[str] = frozenset()
    pending_prefill_tokens: int = 0
    engine_queue: int = -1


@dataclass(slots=True)
class Decision:
    backend: Candidate
    costs: dict[str, float] = field(default_factory=dict)
    policy: str = ""


class NoCandidate(Exception):
    """No backend can take this request (none healthy / none serves the model)."""


class CandidateFilter(abc.ABC):
    @abc.abstractmethod
    def filter(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]: ...


class Scorer(abc.ABC):
    name: str = "score"

    @abc.abstractmethod
    def score(self, ctx: RequestContext, cands: list[Candidate]) -> list[float]:
        """One cost per candidate, same order; lower is better."""


class Picker(abc.ABC):
    @abc.abstractmethod
    def pick(self, ctx: RequestContext, cands: list[Candidate], costs: list[float]) -> int:
        """Index of the chosen candidate; ``cands`` is never empty."""


class Policy:
    """A pipeline of filters, weighted scorers and a picker.  Subclasses may react to outcomes through
    ``on_routed`` (right after the choice) and ``on_first_token`` (when the backend starts answering)."""

    needs_tokens = False

    def __init__(self, name: str, filters: Sequence[CandidateFilter],
                 scorers: Sequence[tuple[Scorer, float]], picker: Picker) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker

    def choose(self, ctx: RequestContext, backends: Sequence[Candidate],
               exclude: frozenset[str] = frozenset()) -> Decision:
        cands = [b for b in backends if b.name not in exclude]
        for f in self.filters:
            cands = f.filter(ctx, cands)
        if not cands:
            raise NoCandidate(f"no healthy backend serves model {ctx.model!r}")
        total = [0.0] * len(cands)
        per: dict[str, list[float]] = {}
        for scorer, weight in self.scorers:
            s = scorer.score(ctx, cands)
            per[scorer.name] = s
            total = [t + weight * v for t, v in zip(total, s, strict=True)]
        i = self.picker.pick(ctx, cands, total)
        return Decision(cands[i], {k: v[i] for k, v in per.items()}, self.name)

    def on_routed(self, ctx: RequestContext, backend: str) -> None:
        """Called once the request is committed to ``backend`` (before it is sent)."""

    def on_first_token(self, ctx: RequestContext, backend: str, ttft_s: float, queued_tokens: int) -> None:
        """Called when ``backend`` produced its first byte; ``queued_tokens`` were ahead of it at dispatch."""
