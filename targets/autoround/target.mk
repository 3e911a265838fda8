# AutoRound (Intel auto-round): int4/int2/3/8 weight-only quantization of LLMs and MLLMs,
# offline, every export reloaded on CPU and compared with the float model and with RTN.
#   make autoround MODEL=<recipe> [BITS=4] [GROUP_SIZE=32] [SYM=1] [ITERS=..] [NSAMPLES=..]
#        [SEQLEN=..] [FORMAT=auto_round,auto_gptq,auto_awq | gguf:q4_0 | gguf:q4_k_m]
#        [QUANT_NONTEXT=1] [DATA=calib.json|.jsonl] [IMAGES=<LLaVA json's image dir>]
#        [TEMPLATE=t.json]
#        [EVAL_WINDOWS=<held-out windows; default the recipe's eval.num_windows>]
#        [SEQUENTIAL=0|1 (whole model | block by block; default: block by block where possible)]
# auto-round and its extra dependencies come from targets/autoround/requirements.txt and are
# installed into the shared venv once (stamp keyed on that file's hash).
AUTOROUND_REQ   := targets/autoround/requirements.txt
AUTOROUND_HASH  := $(shell sha256sum $(AUTOROUND_REQ) | cut -c1-16)
AUTOROUND_STAMP := $(VENV)/.edgeforge-autoround-$(AUTOROUND_HASH)
#: The make variables of ar_options.Options, in declaration order.
AUTOROUND_OPTIONS := BITS GROUP_SIZE SYM ITERS NSAMPLES SEQLEN FORMAT QUANT_NONTEXT DATA IMAGES \
  TEMPLATE EVAL_WINDOWS SEQUENTIAL MAX_MEMORY
AUTOROUND_VARS = $(call option_vars,$(AUTOROUND_OPTIONS))
AUTOROUND_ARGS = $(call option_args,$(AUTOROUND_OPTIONS))
.PHONY: autoround autoround-venv

autoround-venv: $(AUTOROUND_STAMP) ## install auto-round's pinned extras into the venv

$(AUTOROUND_STAMP): $(AUTOROUND_REQ) $(STAMP)
	@rm -f $(VENV)/.edgeforge-autoround-*
	$(PY) -m pip install --disable-pip-version-check --progress-bar off --no-deps -r $(AUTOROUND_REQ)
	$(PY) -c "import auto_round, auto_round_kernel, datasets, sentencepiece"
	@touch $@

autoround: venv autoround-venv ## AutoRound W4 (default) quantization + offline reload check: build/<MODEL>/autoround/
ifeq ($(USE_DOCKER),1)
	docker/run.sh autoround autoround MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(AUTOROUND_VARS)
else
	$(PY) targets/autoround/build.py $(MODEL_ARGS) $(AUTOROUND_ARGS)
endif
