"""Several service processes on one Redis: any node accepts a job, exactly one node runs it."""

from actors.cluster.follower import StreamFollower
from actors.cluster.node import ClusterNode, new_node_id

__all__ = ["ClusterNode", "StreamFollower", "new_node_id"]
