"""Fixtures for evaluation tests: the real MSD hippocampus set (read in place, never copied)."""

from __future__ import annotations
