"""Keel onnx."""
