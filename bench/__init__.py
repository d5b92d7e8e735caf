"""Throughput benchmarks (`make bench`, i.e. `python -m bench.run`): not tests, no timing assertions."""
