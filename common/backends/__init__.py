"""One vendor toolchain driver each: QNN (EP sessions, QDQ, config, GPTQ on pieces), tpu-mlir.

A layer of common/ (see common/__init__.py for the order and the import rule)."""
