"""Where Quilt keeps things on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    state_dir: Path = Path("/var/lib/quilt")  # survives reboots: db, images, container layers
    run_dir: Path = Path("/run/quilt")  # lives as long as the boot: exit statuses

    @property
    def database(self) -> Path:
        return self.state_dir / "quilt.db"

    @property
    def images(self) -> Path:
        return self.state_dir / "images"

    @property
    def volumes(self) -> Path:
        return self.state_dir / "volumes"

    def volume_dir(self, name: str) -> Path:
        return self.volumes / name

    def container_dir(self, container_id: str) -> Path:
        return self.state_dir / "containers" / container_id

    @property
    def run_containers(self) -> Path:
        """Where each container's run dir is."""
        return self.run_dir / "containers"

    def container_run_dir(self, container_id: str) -> Path:
        return self.run_containers / container_id

    def exit_file(self, container_id: str) -> Path:
        return self.container_run_dir(container_id) / "exit"

    @property
    def ip_forward_before(self) -> Path:
        """net.ipv4.ip_forward as quiltd found it this boot (hostreset.py)."""
        return self.run_dir / "ip_forward.before"

    def create(self) -> None:
        for path in (self.state_dir, self.images, self.volumes, self.state_dir / "containers",
                     self.run_containers):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Open for lookup: it holds quiltd.sock, which non-root members of the
        # quilt group must reach; what is private lies in its 0700 subdirectories.
        self.run_dir.chmod(0o755)
