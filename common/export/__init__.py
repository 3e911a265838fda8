"""Artifacts from a model: ONNX pieces (of :mod:`common.models.static_decoder`), the vision
encoder, .mllm files, calibration archives.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
