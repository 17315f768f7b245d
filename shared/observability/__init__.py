"""Logs, metrics and health: what every voxelflow process exposes to its operators."""
