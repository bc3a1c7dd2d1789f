"""Benchmarks of the saga orchestrator: the load generator, the four-call floor and peer engines."""
