"""Keel ingress."""
