"""Files and trees handled safely: in-root lookups, one tar engine, one tree removal."""
