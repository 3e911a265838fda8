"""Quantization math and rotations, as pure functions over tensors and adapters.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
