# cpu-fp32-rotated: make cpu MODEL=<recipe> [ROTATE_MODE=hadamard|orthogonal] [SEED=n]
#   [R_PATH=rotation file] [CONFIG=mllm QNN convertor config] [EVAL_WINDOWS=n] [SEQ_LEN=n]
#   [STATS_WINDOWS=n] [USE_DOCKER=1]
# Writes build/<MODEL>/cpu-fp32-rotated/ (targets/cpu-fp32-rotated/README.md). Options left
# empty fall back to the recipe's targets["cpu-fp32-rotated"] and then the script defaults.
.PHONY: cpu

CPU_VARS = $(if $(ROTATE_MODE),ROTATE_MODE=$(ROTATE_MODE)) $(if $(SEED),SEED=$(SEED)) \
  $(if $(R_PATH),R_PATH=$(R_PATH)) $(if $(CONFIG),CONFIG=$(CONFIG)) \
  $(if $(EVAL_WINDOWS),EVAL_WINDOWS=$(EVAL_WINDOWS)) $(if $(SEQ_LEN),SEQ_LEN=$(SEQ_LEN)) \
  $(if $(STATS_WINDOWS),STATS_WINDOWS=$(STATS_WINDOWS))
CPU_ARGS = $(if $(ROTATE_MODE),--rotate-mode $(ROTATE_MODE)) $(if $(SEED),--seed $(SEED)) \
  $(if $(R_PATH),--r-path $(R_PATH)) $(if $(CONFIG),--config $(CONFIG)) \
  $(if $(EVAL_WINDOWS),--num-windows $(EVAL_WINDOWS)) $(if $(SEQ_LEN),--seq-len $(SEQ_LEN)) \
  $(if $(STATS_WINDOWS),--stats-windows $(STATS_WINDOWS))

cpu: venv ## rotated FP32 model (HF dir + model.mllm), checked vs the original: build/<MODEL>/cpu-fp32-rotated
ifeq ($(USE_DOCKER),1)
	docker/run.sh cpu-fp32-rotated cpu MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(CPU_VARS)
else
	$(PY) targets/cpu-fp32-rotated/build.py $(MODEL_ARGS) $(CPU_ARGS)
endif
