"""OpenAI-compatible gateway."""

from kvmesh.gateway.app import Gateway
from kvmesh.gateway.backends import Backend, BackendPool
from kvmesh.api.errors import ApiError

__all__ = ["ApiError", "Backend", "BackendPool", "Gateway"]
