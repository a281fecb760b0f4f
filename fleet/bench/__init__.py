"""Benchmarks: measured figures for the draft model, the verifier and the whole system."""
