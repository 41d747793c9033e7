"""Quilt's adapter over dbus-next: the only package that reaches into dbus-next's internals. Both the
daemon and the client use it.
"""
