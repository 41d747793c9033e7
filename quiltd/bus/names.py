"""Every bus name, object path and interface name Quilt uses, in one place."""

BUS_NAME = "org.quilt.Quilt1"
MANAGER_PATH = "/org/quilt/Quilt1"
MANAGER_INTERFACE = "org.quilt.Quilt1.Manager"
CONTAINER_INTERFACE = "org.quilt.Quilt1.Container"
CONTAINER_PATH_PREFIX = "/org/quilt/Quilt1/container/"


def container_path(container_id: str) -> str:
    return CONTAINER_PATH_PREFIX + container_id
