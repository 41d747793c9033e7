"""The host's systemd and kernel facilities quiltd uses: transient scopes, cgroup usage, sd_notify, the
journal, and files opened with a caller's credentials.
"""
