"""Evaluation: metrics, datasets, the runner and the simulated world."""
