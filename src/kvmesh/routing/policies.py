"""Load-balancing policies built from the filter → scorer → picker pieces."""

from __future__ import annotations

import itertools
import random

from kvmesh.routing.base import Candidate, CandidateFilter, Picker, Policy, RequestContext, Scorer, Scores


class HealthyServingModel(CandidateFilter):
    """Keep backends that are healthy and serve the requested model (an empty model set means unknown yet:
    such a backend is kept, so a gateway that has not fetched ``/v1/models`` still routes)."""

    def filter(self, ctx: RequestContext, cands: list[Candidate]) -> list[Candidate]:
        return [c for c in cands if c.healthy and (not c.models or ctx.model in c.models)]


class InFlight(Scorer):
    name = "in_flight"

    def score(self, ctx: RequestContext, cands: list[Candidate], explain: bool = False) -> Scores:
        return Scores([float(c.in_flight) for c in cands])


class RandomPicker(Picker):
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, ctx: RequestContext, cands: list[Candidate], costs: list[float]) -> int:
        return self.rng.randrange(len(cands))


class RoundRobinPicker(Picker):
    """Cycles over backend names in sorted order, skipping ones filtered out for this request, so
    a backend that leaves and comes back does not shift everyone else's turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, ctx: RequestContext, cands: list[Candidate], costs: list[float]) -> int:
        order = sorted(range(len(cands)), key=lambda i: cands[i].name)
        return order[next(self._counter) % len(order)]


class MinCostPicker(Picker):
    """Lowest cost wins; ties are broken at random so equal backends share load evenly."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, ctx: RequestContext, cands: list[Candidate], costs: list[float]) -> int:
        best = min(costs)
        ties = [i for i, c in enumerate(costs) if c == best]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)


def random_policy(name: str, rng: random.Random | None = None) -> Policy:
    return Policy(name, [HealthyServingModel()], [], RandomPicker(rng))


def round_robin_policy(name: str, rng: random.Random | None = None) -> Policy:
    return Policy(name, [HealthyServingModel()], [], RoundRobinPicker())


def least_request_policy(name: str, rng: random.Random | None = None) -> Policy:
    return Policy(name, [HealthyServingModel()], [(InFlight(), 1.0)], MinCostPicker(rng))
