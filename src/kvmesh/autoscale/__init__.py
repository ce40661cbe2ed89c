"""Autoscaling: one decision core (``core``: Policy → Scaler → Actuator) over typed signals (``signals``),
kvmesh's own SLO policy (``slo``), faithful baselines (``policies``: kpa, hpa, queue, dynamo) and cache-aware
scale-in/out (``cacheaware``).  Imports nothing: import from the defining module."""
