"""Coordination: single-flight loads and distributed locks."""
