"""Argon's core benchmark (`python -m benchmarks.core`, see `__main__` and benchmarks/README.md):
`common`, `procfs`, `worker`, `targets`, `scenarios`, `report`."""
