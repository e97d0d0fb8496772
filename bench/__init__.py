"""Clients of the stack: the benchmark, the demo and workload replay."""
