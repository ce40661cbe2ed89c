"""KV index: which engine (and tier) holds which prefix block, fed by engines' KV events.

Modules: ``events`` (vLLM's KV-event wire format), ``hashing`` (chained block keys), ``index`` (:class:`KvIndex`),
``subscriber`` (ZMQ subscribers feeding it).  The package imports nothing, so the cache node and the simulator
can use the wire format without loading the index or ZMQ subscribers; import from the defining modules.
"""
