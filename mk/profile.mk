# Activation profiling, W8A8 simulation and the profiling benchmark.
# Knobs: NUM_SAMPLES, SEQ_LEN, SEED, SEQUENTIAL=0|1 (also simulate, sweep), MAX_MEMORY=8GB,
# ROTATE=hadamard|orthogonal, R_PATH=file, ONLINE_DOWN=1, CONFIG=<mllm QNN config>,
# IMAGES=<folder>, IMAGE_SIZE, EXACT_PERCENTILES=1 (profile); T, CLIP_ALL, THRESHOLDS (simulate);
# PROFILE=<profile.json>, THRESHOLDS, NUM_WINDOWS (sweep).
PROFILE_ARGS = $(if $(NUM_SAMPLES),--num-samples $(NUM_SAMPLES)) $(if $(SEQ_LEN),--seq-len $(SEQ_LEN)) \
	$(if $(SEED),--seed $(SEED)) $(if $(CORPUS),--corpus $(CORPUS))
.PHONY: profile simulate sweep bench bench-scale

profile: venv ## streaming activation profile: build/<MODEL>/profile[-<ROTATE>]/{profile.json,report.md}
	$(PY) -m common.steps.profile_cli profile $(MODEL_ARGS) $(PROFILE_ARGS) \
		$(if $(SEQUENTIAL),--sequential $(SEQUENTIAL)) $(if $(MAX_MEMORY),--max-memory $(MAX_MEMORY)) \
		$(if $(ROTATE),--rotate $(ROTATE)) $(if $(R_PATH),--r-path $(R_PATH)) \
		$(if $(ONLINE_DOWN),--online-down $(ONLINE_DOWN)) $(if $(CONFIG),--config-file $(CONFIG)) \
		$(if $(IMAGES),--images $(IMAGES)) $(if $(IMAGE_SIZE),--image-size $(IMAGE_SIZE)) \
		$(if $(EXACT_PERCENTILES),--exact-percentiles $(EXACT_PERCENTILES))

simulate: venv ## W8A8 variants + threshold sweep: build/<MODEL>/simulate/{report.json,shadow_layers.json}
	$(PY) -m common.steps.profile_cli simulate $(MODEL_ARGS) $(PROFILE_ARGS) \
		$(if $(T),--t $(T)) $(if $(CLIP_ALL),--clip-all $(CLIP_ALL)) \
		$(if $(ROTATE),--rotate $(ROTATE)) $(if $(THRESHOLDS),--thresholds $(THRESHOLDS)) \
		$(if $(NUM_WINDOWS),--num-windows $(NUM_WINDOWS)) $(if $(MAX_MEMORY),--max-memory $(MAX_MEMORY)) \
		$(if $(SEQUENTIAL),--sequential $(SEQUENTIAL))

sweep: venv ## threshold sweep on an existing profile: build/<MODEL>/sweep/{report.json,shadow_layers.json}
	$(PY) -m common.steps.profile_cli sweep $(MODEL_ARGS) $(if $(PROFILE),--profile $(PROFILE)) \
		$(if $(THRESHOLDS),--thresholds $(THRESHOLDS)) $(if $(NUM_WINDOWS),--num-windows $(NUM_WINDOWS)) \
		$(if $(SEQ_LEN),--seq-len $(SEQ_LEN)) $(if $(MAX_MEMORY),--max-memory $(MAX_MEMORY)) \
		$(if $(SEQUENTIAL),--sequential $(SEQUENTIAL))

bench: venv ## profiling cost vs plain inference, sequential-mode RSS: build/bench/profile.json
	$(PY) bench/profile_bench.py --build-dir $(BUILD_DIR) $(if $(NUM_SAMPLES),--num-samples $(NUM_SAMPLES)) \
		$(if $(SEQ_LEN),--seq-len $(SEQ_LEN))

bench-scale: venv ## real-size random checkpoints through the named steps: build/bench/scale.json
	$(PY) bench/scale.py --build-dir $(BUILD_DIR) $(if $(MODELS),--models $(MODELS)) \
		$(if $(STEPS),--steps $(STEPS)) $(if $(QUICK),--quick)
