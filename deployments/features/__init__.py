"""Keel features."""
