"""The D-Bus face of quiltd: converts, calls the core, converts back. No logic here."""
