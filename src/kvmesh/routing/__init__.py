"""Routing policies: candidate filters → scorers → picker, over a request context."""

from kvmesh.routing.base import (
    Candidate,
    CandidateState,
    Decision,
    NoCandidate,
    Policy,
    RequestContext,
)
from kvmesh.routing.factory import POLICIES, make_policy

__all__ = ["POLICIES", "Candidate", "CandidateState", "Decision", "NoCandidate", "Policy", "RequestContext",
           "make_policy"]
