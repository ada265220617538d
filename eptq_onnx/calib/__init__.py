"""Calibration data (files and feeds) and activation statistics."""
