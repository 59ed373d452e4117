"""Keel's application graph and command line."""
