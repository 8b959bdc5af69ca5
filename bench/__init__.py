"""Benchmarks: each runs its competitors in one process tree and one run, prints a table of
ratios and writes JSON under bench/results/ (`python -m bench.throughput`)."""
