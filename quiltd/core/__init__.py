"""The container state machine and the services it coordinates: plain typed Python on the event loop,
with no D-Bus and no syscalls of its own.
"""
