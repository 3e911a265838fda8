"""Quantization math and rotations, as pure functions over tensors and adapters, and the
named precision schemes every target's plan is written from (:mod:`common.quant.schemes`).

A layer of common/ (see common/__init__.py for the order and the import rule)."""
