"""Engine replicas: the :class:`Engine` interface, its vLLM implementation and the supervisor."""

from kvmesh.engines.base import Engine, EngineState
from kvmesh.engines.sim import SimEngine
from kvmesh.engines.supervisor import Supervisor
from kvmesh.engines.vllm import VllmEngine, vllm_available

__all__ = ["Engine", "EngineState", "SimEngine", "Supervisor", "VllmEngine", "vllm_available"]
