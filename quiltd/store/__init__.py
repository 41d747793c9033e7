"""Quilt's state in SQLite: the only package with SQL."""
