"""Benchmarks (not tests): what layerwatch costs a training, and how fast its server is.

Each figure is one script, `python -m bench.<name> [--quick]`, measured in one
process with the compared variants alternated in blocks, so a noisy machine
slows all of them alike; results print as `name: value  (target ...)` lines.
"""
