"""Benchmarks: latency, throughput and LIME cost, with reports and plots."""
