"""Keel cache."""
