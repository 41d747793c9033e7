"""Quilt across many hosts, on Ray: `QuiltCluster(address="auto")`. Needs the extra `cluster` (ray)."""

from quiltd.cluster.cluster import QuiltCluster, Sandbox
from quiltd.cluster.records import HostInfo, MapResult, SandboxRecord, SandboxSummary

__all__ = ["HostInfo", "MapResult", "QuiltCluster", "Sandbox", "SandboxRecord", "SandboxSummary"]
