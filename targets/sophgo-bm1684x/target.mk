# SOPHGO BM1684X (TPU-MLIR): make sophgo-toolchain [LLM_CONVERT=1] [PYTHON310=/path/to/python3.10] [USE_DOCKER=1]
# tpu-mlir is cp310-only and pins numpy 1.24 / protobuf 3.20, so it lives in its own venv
# (SOPHGO_VENV, git-ignored) built from targets/sophgo-bm1684x/requirements-tpu-mlir.txt;
# the project's .venv drives its tools as subprocesses (common/backends/tpu_mlir.py).
# LLM_CONVERT=1 builds the second venv ROUTE=llm_convert needs (SOPHGO_LLM_VENV: torch 2.1,
# GNU parallel; requirements-llm-convert.txt).
# USE_DOCKER=1 runs in the sophgo image (targets/sophgo-bm1684x/Dockerfile, docker/image.sh),
# whose /opt/tpu-mlir-venv the same setup script made from the host's Python 3.10 (PYTHON310
# picks it, as natively); sophgo-toolchain then re-runs the script's checks on that venv. The
# image holds the ROUTE=onnx venv only: ROUTE=llm_convert (6.5 GB more) runs natively.
SOPHGO_NO_LLM_IMAGE = { echo "error: the sophgo image holds the ROUTE=onnx venv only; run ROUTE=llm_convert (LLM_CONVERT=1) without USE_DOCKER" >&2; exit 2; }
SOPHGO_VENV ?= .venv-tpu-mlir
SOPHGO_LLM_VENV ?= .venv-tpu-mlir-llm
PYTHON310   ?=
LLM_CONVERT ?=
.PHONY: sophgo-toolchain

sophgo-toolchain: $(HOST_VENV) ## SOPHGO: pinned Python 3.10 tpu-mlir venv (.venv-tpu-mlir; LLM_CONVERT=1: .venv-tpu-mlir-llm), fixes checked
ifeq ($(USE_DOCKER),1)
	@$(if $(LLM_CONVERT),$(SOPHGO_NO_LLM_IMAGE))
	PYTHON310=$(PYTHON310) docker/run.sh sophgo-bm1684x sophgo-toolchain SOPHGO_VENV=/opt/tpu-mlir-venv PYTHON310=/opt/python3.10/bin/python3.10
else
	$(PY) targets/sophgo-bm1684x/setup_toolchain.py $(if $(LLM_CONVERT),--llm-convert --venv $(SOPHGO_LLM_VENV),--venv $(SOPHGO_VENV)) $(if $(PYTHON310),--python $(PYTHON310))
endif

# make sophgo MODEL=<recipe> [MODE=bf16|f16|w8bf16|w4bf16] [CHIP=bm1684x|bm1688] [SEQ_LEN=n]
#             [ROUTE=onnx|llm_convert] [Q_GROUP_SIZE=64] [DECODE_TOKENS=n] [VERIFY=auto|full|sample]
# MODE is shared with other targets (axera defines it empty), so the default is applied here.
# ROUTE=llm_convert runs in its own venv (SOPHGO_LLM_VENV, from LLM_CONVERT=1 below).
#: The make variables of build.py's Options, in declaration order. ROUTE also picks the
#: tpu-mlir venv below, so it has its default here too.
SOPHGO_OPTIONS := MODE CHIP ROUTE SEQ_LEN Q_GROUP_SIZE DECODE_TOKENS VERIFY MAX_MEMORY
ROUTE ?= onnx
SOPHGO_ARGS = $(call option_args,$(SOPHGO_OPTIONS))
.PHONY: sophgo
sophgo: $(HOST_VENV) ## SOPHGO BM1684X: bmodel (MODE=bf16|f16|w8bf16|w4bf16, ROUTE=onnx|llm_convert), checked on the simulator
ifeq ($(USE_DOCKER),1)
	@$(if $(filter llm_convert,$(ROUTE)),$(SOPHGO_NO_LLM_IMAGE))
	PYTHON310=$(PYTHON310) docker/run.sh sophgo-bm1684x sophgo MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(call option_vars,$(SOPHGO_OPTIONS)) SOPHGO_VENV=/opt/tpu-mlir-venv
else
	$(PY) targets/sophgo-bm1684x/build.py $(MODEL_ARGS) $(SOPHGO_ARGS) --venv $(if $(filter llm_convert,$(ROUTE)),$(SOPHGO_LLM_VENV),$(SOPHGO_VENV))
endif
