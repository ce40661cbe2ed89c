"""Cache nodes as one pool: consistent-hash placement, replication, peer transfers, membership."""
