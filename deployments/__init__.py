"""Keel's Ray Serve deployments: each concern is a plain core beside a thin Ray shell."""
