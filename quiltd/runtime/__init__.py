"""Everything that runs inside or next to a container: the fork server, the container's init, the exec
and copy helpers, and the daemon's side of them.
"""
