"""vLLM's side of the cache: ``vllm.KvmeshConnector`` (loaded by vLLM by module path) and ``layout`` (block copies).

Runs inside vLLM's engine-core and worker processes: imports only the cache's engine-side modules (client,
protocol, keys, chunk, arena, pool.direct), never the node daemon, the gateway or kvmesh's config.
"""
