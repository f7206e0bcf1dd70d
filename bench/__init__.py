"""Speed and memory benchmarks (not part of pytest): `python bench/run.py --config small`."""
