"""kvmesh: KV-cache-centric LLM serving."""

__version__ = "0.1.0"
