"""Errors, records, recipes and paths: the bottom layer, no torch and no model.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
