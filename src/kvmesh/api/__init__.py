"""The OpenAI HTTP API as kvmesh speaks it: request validation and OpenAI-style errors.

Below both the gateway and the simulated engine (each serves this API), so neither imports the other.
"""
