"""Every bus name, object path and interface name Quilt uses, and the host's name of a container's interface.

In one place, because clients and tools name these things too.
"""

BUS_NAME = "org.quilt.Quilt1"
# The fork server's scope, in the system slice: named so that nothing takes it
# for a container's (those are quilt-<id>.scope, in quilt.slice).
FORKSERVER_SCOPE = "quiltd-forkserver.scope"
MANAGER_PATH = "/org/quilt/Quilt1"
MANAGER_INTERFACE = "org.quilt.Quilt1.Manager"
CONTAINER_INTERFACE = "org.quilt.Quilt1.Container"
CONTAINER_PATH_PREFIX = "/org/quilt/Quilt1/container/"


def container_path(container_id: str) -> str:
    return CONTAINER_PATH_PREFIX + container_id


VETH_PREFIX = "qv"  # host ends: qv + the first 13 hex digits of the container id (15 chars, IFNAMSIZ-1)


def veth_name(container_id: str) -> str:
    return VETH_PREFIX + container_id[:13]
