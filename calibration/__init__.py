"""Calibration data and forward loops."""
