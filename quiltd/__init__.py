"""Quilt: a container runtime for AI-agent sandboxes on systemd hosts."""

__version__ = "0.1.0"
