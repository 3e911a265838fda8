"""Artifacts from a model: ONNX pieces, the vision encoder, .mllm files, calibration archives.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
