"""Operators' view of a kvmesh fleet: Grafana dashboards, Prometheus alert rules, ``kvmesh top``."""
