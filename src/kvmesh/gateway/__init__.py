"""OpenAI-compatible gateway."""

from kvmesh.api.errors import ApiError
from kvmesh.gateway.app import Gateway
from kvmesh.gateway.backends import Backend, BackendPool

__all__ = ["ApiError", "Backend", "BackendPool", "Gateway"]
