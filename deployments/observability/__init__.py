"""Keel observability."""
