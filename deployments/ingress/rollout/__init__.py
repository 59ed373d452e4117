"""Rollout features: the traffic split, shadow copies, the payload log, input drift."""
