"""Benchmark harness: meshpy against no proxy, nginx and HAProxy on one machine.

Run from the repository root with ``python -m bench``; see bench/README.md.
"""
