"""Layer 1: the algorithms, pure torch (no Lightning): targets, importance, masks, baselines."""
