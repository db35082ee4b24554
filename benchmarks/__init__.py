"""Micro-benchmarks: the hot paths beside their upstream equivalents (``make microbench``)."""
