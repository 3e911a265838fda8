# QNN (Qualcomm HTP): make qnn MODEL=<recipe> [SOCS=SM8650,SM8750] [PRESET=w8a16|w8a8|w4a16]
#   [SEQ_LEN=n] [PROFILE=profile.json] [USE_DOCKER=1]
# Needs build/<MODEL>/profile/profile.json (make profile). Writes build/<MODEL>/qnn/: the mllm
# int8 model and per-SoC QNN context binaries, verified on the x86 HTP emulator
# (targets/qnn/README.md). onnxruntime-qnn comes from targets/qnn/requirements.txt,
# installed into the shared venv once (stamp keyed on that file's hash).
QNN_REQ   := targets/qnn/requirements.txt
QNN_HASH  := $(shell sha256sum $(QNN_REQ) | cut -c1-16)
QNN_STAMP := $(VENV)/.edgeforge-qnn-$(QNN_HASH)
SOCS      ?=
PRESET    ?=
SEQ_LEN   ?=
PROFILE   ?=
QNN_VARS = $(foreach v,SOCS PRESET SEQ_LEN PROFILE,$(if $($(v)),$(v)=$($(v))))
QNN_ARGS = $(if $(SOCS),--socs $(SOCS)) $(if $(PRESET),--preset $(PRESET)) \
  $(if $(SEQ_LEN),--seq-len $(SEQ_LEN)) $(if $(PROFILE),--profile $(PROFILE))
.PHONY: qnn qnn-venv qnn-rotated-fp32

qnn-venv: $(QNN_STAMP) ## install onnxruntime-qnn (pinned) into the venv

$(QNN_STAMP): $(QNN_REQ) $(STAMP)
	@rm -f $(VENV)/.edgeforge-qnn-*
	$(PY) -m pip install --disable-pip-version-check --progress-bar off --no-deps -r $(QNN_REQ)
	$(PY) -c "import onnxruntime_qnn"
	@touch $@

qnn: venv qnn-venv ## QNN HTP: model.int8.mllm + context binaries per SoC, checked on the HTP emulator
ifeq ($(USE_DOCKER),1)
	docker/run.sh qnn qnn MODEL=$(MODEL) BUILD_DIR=$(BUILD_DIR) $(if $(MODEL_PATH),MODEL_PATH=$(MODEL_PATH)) $(QNN_VARS)
else
	$(PY) targets/qnn/build.py $(MODEL_ARGS) $(QNN_ARGS)
endif

qnn-rotated-fp32: cpu ## mllm export_rotate_model: the FP32 rotated CPU model (= make cpu)
