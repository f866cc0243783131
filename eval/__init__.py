"""Evaluation: quality metrics, measured and modeled cost, gates and reports. Never imports a pass."""
