# AXERA AX650 (Pulsar2): make axera MODEL=<recipe> [MODE=image|video|llm] [AXERA_ARGS="--calib-dir d ..."] [USE_DOCKER=1]
# Without USE_DOCKER the ONNX/calibration/config/embeddings are built and checked here, and
# build.sh (the Pulsar2 compile) runs only if `pulsar2` is on PATH. With USE_DOCKER=1 the
# same step runs in the cpu image (docker/image.sh), which has no Pulsar2, or, with
# PULSAR2_IMAGE=<name:tag> (AXERA's docker-loaded image), in the Pulsar2 image built on it.
#: The make variables of build.py's Options; its other options (--image-size, --prefill-len,
#: ...) pass verbatim through AXERA_ARGS.
AXERA_OPTIONS := MODE MAX_MEMORY
AXERA_ARGS ?=
.PHONY: axera

axera: venv ## AXERA AX650: vision ONNX + calib tar + Pulsar2 configs + bf16 embeddings + build.sh (MODE=image|video)
ifeq ($(USE_DOCKER),1)
	docker/run.sh axera-ax650 axera MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(call option_vars,$(AXERA_OPTIONS)) $(if $(AXERA_ARGS),AXERA_ARGS="$(AXERA_ARGS)")
else
	$(PY) targets/axera-ax650/build.py $(MODEL_ARGS) $(call option_args,$(AXERA_OPTIONS)) $(AXERA_ARGS)
endif
