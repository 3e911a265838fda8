# SOPHGO BM1684X (TPU-MLIR): make sophgo-toolchain [PYTHON310=/path/to/python3.10] [USE_DOCKER=1]
# tpu-mlir is cp310-only and pins numpy 1.24 / protobuf 3.20, so it lives in its own venv
# (SOPHGO_VENV, git-ignored) built from targets/sophgo-bm1684x/requirements-tpu-mlir.txt;
# the project's .venv drives its tools as subprocesses (common/tpu_mlir.py).
SOPHGO_VENV ?= .venv-tpu-mlir
PYTHON310   ?=
.PHONY: sophgo-toolchain

sophgo-toolchain: venv ## SOPHGO: pinned Python 3.10 tpu-mlir venv (.venv-tpu-mlir), fixes applied and checked
ifeq ($(USE_DOCKER),1)
	docker/run.sh sophgo-bm1684x sophgo-toolchain SOPHGO_VENV=/opt/tpu-mlir-venv PYTHON310=/usr/bin/python3.10
else
	$(PY) targets/sophgo-bm1684x/setup_toolchain.py --venv $(SOPHGO_VENV) $(if $(PYTHON310),--python $(PYTHON310))
endif

# make sophgo MODEL=<recipe> [MODE=bf16|f16|w8bf16|w4bf16] [CHIP=bm1684x|bm1688] [SEQ_LEN=n]
# MODE is shared with other targets (axera defines it empty), so the default is applied here.
SOPHGO_MODE = $(or $(MODE),bf16)
CHIP    ?= bm1684x
SEQ_LEN ?=
.PHONY: sophgo
sophgo: venv ## SOPHGO BM1684X: pieces → bmodel (MODE=bf16|f16|w8bf16|w4bf16), checked on the simulator
ifeq ($(USE_DOCKER),1)
	docker/run.sh sophgo-bm1684x sophgo MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) MODE=$(SOPHGO_MODE) CHIP=$(CHIP) $(if $(SEQ_LEN),SEQ_LEN=$(SEQ_LEN)) SOPHGO_VENV=/opt/tpu-mlir-venv
else
	$(PY) targets/sophgo-bm1684x/build.py $(MODEL_ARGS) --mode $(SOPHGO_MODE) --chip $(CHIP) --venv $(SOPHGO_VENV) $(if $(SEQ_LEN),--seq-len $(SEQ_LEN))
endif
