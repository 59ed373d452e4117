"""Keel fleets: many small models multiplexed on one deployment."""
