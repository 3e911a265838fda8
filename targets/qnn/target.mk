# QNN (Qualcomm HTP): make qnn MODEL=<recipe> [SOCS=SM8650,SM8750] [PRESET=w8a16|w8a8|w4a16]
#   [ROTATE=hadamard|orthogonal|none] [ROUNDING=gptq|nearest] [PREFILL_LEN=n] [KV_LEN=n]
#   [E2E_WINDOWS=n] [OPT_MODE=auto|3|2|1] [IMAGES=dir] [IMAGE_SIZE=px]
#   [VISION_PRESET=w8a16|w8a8|w4a16] [VERIFY=auto|full|sample] [PROFILE=profile.json] [USE_DOCKER=1]
# Reads make profile's output for ROTATE (default hadamard: build/<MODEL>/profile-hadamard/
# profile.json; made on demand when missing) and, when present,
# build/<MODEL>/simulate/shadow_layers.json (the T chosen by make simulate). Writes
# build/<MODEL>/qnn/: the mllm int8 model and per-SoC QNN context binaries, verified on the
# x86 HTP emulator (targets/qnn/README.md). onnxruntime-qnn comes from
# targets/qnn/requirements.txt, installed into the shared venv once (stamp keyed on that
# file's hash).
QNN_REQ   := targets/qnn/requirements.txt
QNN_HASH  := $(shell sha256sum $(QNN_REQ) | cut -c1-16)
QNN_STAMP := $(VENV)/.edgeforge-qnn-$(QNN_HASH)
#: The make variables of build.py's Options, in declaration order.
QNN_OPTIONS := SOCS PRESET ROTATE PREFILL_LEN KV_LEN E2E_WINDOWS ROUNDING OPT_MODE IMAGES IMAGE_SIZE VISION_PRESET VERIFY PROFILE MAX_MEMORY
QNN_VARS = $(call option_vars,$(QNN_OPTIONS))
QNN_ARGS = $(call option_args,$(QNN_OPTIONS))
#: The rotation of the profile make qnn reads by default (empty: none), and that profile:
#: PROFILE=, else make profile's output for it (made on demand).
QNN_ROTATE = $(if $(filter none,$(ROTATE)),,$(or $(ROTATE),hadamard))
QNN_PROFILE_DIR = profile$(if $(QNN_ROTATE),-$(QNN_ROTATE))
QNN_PROFILE = $(or $(PROFILE),$(BUILD_DIR)/$(MODEL)/$(QNN_PROFILE_DIR)/profile.json)
.PHONY: qnn qnn-venv qnn-sweep qnn-rotated-fp32

qnn-venv: $(QNN_STAMP) ## install onnxruntime-qnn (pinned) into the venv

$(QNN_STAMP): $(QNN_REQ) $(STAMP)
	@rm -f $(VENV)/.edgeforge-qnn-*
	$(PY) -m pip install --disable-pip-version-check --progress-bar off --no-deps -r $(QNN_REQ)
	$(PY) -c "import onnxruntime_qnn"
	@touch $@

# A vision-language model's profile sees the build's pictures (IMAGES, IMAGE_SIZE as make
# qnn resolves them; targets/qnn/profile_vars.py prints them, nothing for a text model).
$(BUILD_DIR)/$(MODEL)/$(QNN_PROFILE_DIR)/profile.json:
	pictures=$$($(PY) targets/qnn/profile_vars.py $(MODEL) "$(IMAGES)" "$(IMAGE_SIZE)") && \
	$(MAKE) profile MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) ROTATE=$(QNN_ROTATE) \
		$(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $$pictures

qnn: venv qnn-venv $(QNN_PROFILE) ## QNN HTP: model.int8.mllm + context binaries per SoC, checked on the HTP emulator
ifeq ($(USE_DOCKER),1)
	docker/run.sh qnn qnn MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(QNN_VARS)
else
	$(PY) targets/qnn/build.py $(MODEL_ARGS) $(QNN_ARGS)
endif

# make qnn-sweep MODEL=<recipe> [PRESETS=w8a16,w8a8,w4a16] [any make qnn variable but PRESET]:
# each preset built as make qnn builds it, packages moved to build/<MODEL>/qnn-sweep/<preset>/,
# and one table (sweep.md, sweep.json): accuracy block, binary bytes, build time, gates.
QNN_SWEEP_ARGS = $(call option_args,$(filter-out PRESET,$(QNN_OPTIONS)))
qnn-sweep: venv qnn-venv $(QNN_PROFILE) ## QNN presets side by side: accuracy, binary size, build time in one table
ifeq ($(USE_DOCKER),1)
	docker/run.sh qnn qnn-sweep MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(if $(PRESETS),PRESETS=$(PRESETS)) $(filter-out PRESET=%,$(QNN_VARS))
else
	$(PY) targets/qnn/sweep.py $(MODEL_ARGS) $(if $(PRESETS),--presets $(PRESETS)) $(QNN_SWEEP_ARGS)
endif

qnn-rotated-fp32: cpu ## mllm export_rotate_model: the FP32 rotated CPU model (= make cpu)
