# cpu-fp32-rotated: make cpu MODEL=<recipe> [ROTATE_MODE=hadamard|orthogonal] [SEED=n]
#   [R_PATH=rotation file] [CONFIG=mllm QNN convertor config] [EVAL_WINDOWS=n] [SEQ_LEN=n]
#   [STATS_WINDOWS=n] [USE_DOCKER=1]
# Writes build/<MODEL>/cpu-fp32-rotated/ (targets/cpu-fp32-rotated/README.md). Options left
# empty fall back to the recipe's targets["cpu-fp32-rotated"] and then the script defaults.
.PHONY: cpu

#: The make variables of build.py's Options, in declaration order.
CPU_OPTIONS := ROTATE_MODE SEED R_PATH CONFIG EVAL_WINDOWS SEQ_LEN STATS_WINDOWS MAX_MEMORY
CPU_VARS = $(call option_vars,$(CPU_OPTIONS))
CPU_ARGS = $(call option_args,$(CPU_OPTIONS))

cpu: $(HOST_VENV) ## rotated FP32 model (HF dir + model.mllm), checked vs the original: build/<MODEL>/cpu-fp32-rotated
ifeq ($(USE_DOCKER),1)
	docker/run.sh cpu-fp32-rotated cpu MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(CPU_VARS)
else
	$(PY) targets/cpu-fp32-rotated/build.py $(MODEL_ARGS) $(CPU_ARGS)
endif
