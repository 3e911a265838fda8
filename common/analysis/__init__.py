"""Measuring a model: observers, activation profiling, plans, sweeps, simulation, evaluation.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
