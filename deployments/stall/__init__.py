"""Routing around a stalled replica: calls go to replicas that still answer."""
