# Containers (README "Containers"): a base image made from Debian's packages, one image per
# target on top of it (docker build of targets/<t>/Dockerfile), and the engine they run on.
# APT_SOURCES=<files> overrides the host's apt sources for the base.
.PHONY: image-base image-base-check image images-check

image-base: ## base image from Debian packages (mmdebstrap, pinned in docker/base.env): edgeforge/base:<sha>
	APT_SOURCES="$(APT_SOURCES)" docker/base.sh build

image-base-check: ## rebuild the base tarball from scratch; its sha256 must equal the cached one
	APT_SOURCES="$(APT_SOURCES)" docker/base.sh check

image: ## docker build of a target's Dockerfile (TARGET=cpu|qnn|autoround|sophgo|axera [PULSAR2_IMAGE=pulsar2:4.2]): edgeforge/<target>:<hash of inputs>
	PYTHON311=$(PYTHON311) PYTHON310=$(PYTHON310) APT_SOURCES="$(APT_SOURCES)" PULSAR2_IMAGE="$(PULSAR2_IMAGE)" docker/image.sh $(TARGET)

images-check: ## every step with an image, natively and in it: same bytes, same report numbers (slow; STEPS="sophgo ..." for some)
	PYTHON311=$(PYTHON311) PYTHON310=$(PYTHON310) PYTHONPATH=$(CURDIR) python3 docker/images_check.py $(foreach s,$(STEPS),--step $(s))
	$(if $(STEPS),,$(PY) -m pytest tests/docker -m images_check -q)
