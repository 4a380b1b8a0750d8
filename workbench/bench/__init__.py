"""Benchmarks: speed targets shown as ratios against baselines measured in the same run."""
