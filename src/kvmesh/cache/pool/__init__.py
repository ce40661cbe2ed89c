"""Cache nodes as one pool: consistent-hash placement, replication, peer transfers, membership.

Imports nothing: ``pool.direct`` (and the ``pool.peer`` wire format it speaks) runs inside vLLM workers, the
rest (``pool.pool``, ``pool.membership``, ``pool.ring``) only in the cache node.
"""
