"""Example meshpy filters to attach to routes or copy into your own code (see README.md)."""
