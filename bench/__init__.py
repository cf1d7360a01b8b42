"""Benchmarks of the CAT pruning engine (commands, not timed tests); see bench/README.md."""
