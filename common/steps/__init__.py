"""The make steps several targets share (model, eval, profile, simulate, sweep) and their CLIs.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
