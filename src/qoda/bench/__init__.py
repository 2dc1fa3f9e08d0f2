"""Benchmark runners behind ``qoda bench ...``; results go to ``benchmarks/``."""
