"""Simulation: the engine model (block pool, continuous batching, timing profiles) and the virtual-time
cluster simulator that drives kvmesh's real routing policies and KV index."""

from kvmesh.sim.cluster import Cluster, SimResult, make_requests
from kvmesh.sim.core import EngineCore, SimRequest
from kvmesh.sim.profiles import PROFILES, TimingProfile, get_profile

__all__ = ["PROFILES", "Cluster", "EngineCore", "SimRequest", "SimResult", "TimingProfile", "get_profile",
           "make_requests"]
