"""What models are fed: corpora and held-out windows, calibration files, VL preprocessing.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
