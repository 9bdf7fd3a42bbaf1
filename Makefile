# Two commands set up a brand-new machine and run everything:
#   make run    set up the environment, fetch/verify the data, reproduce the pipeline
#   make test   set up the environment, then run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_VERSION := 26.3
# The install is redone only when a lock or the project metadata change.
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-test.lock pyproject.toml | sha256sum | cut -c1-16)
# Never ask a cloud metadata service for credentials: only what the user configured counts.
export AWS_EC2_METADATA_DISABLED := true
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup data params run stop exps prometheus emulator test check lock clean image
.DEFAULT_GOAL := run

setup: $(STAMP)
$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "pip==$(PIP_VERSION)"
	$(BIN)/python -m pip install --quiet -r requirements.lock -r requirements-test.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

# A missing data/ is pulled from the DVC remote (when configured) or regenerated and verified;
# an existing one is DVC's to check (`dvc repro` re-hashes a changed data/).
# .dvc/config.local holds the remote's secret (`dvc remote modify --local`), which DVC writes
# world-readable: it is made readable by its owner only.
data: setup
	@test ! -f .dvc/config.local || chmod 600 .dvc/config.local
	@test -d data || $(BIN)/python -m components.data.sample ensure

# Regenerated from conf/ and the overrides params.yaml records (an applied experiment stays) when its
# content no longer matches them (a digest in its header, checked in milliseconds; file times decide
# nothing); the same command declares the model artifact (package.model_name) in artifacts.yaml and dvc.yaml.
params: setup
	@$(BIN)/python -m components.core.config

# This machine's ports, state folder and webhooks: local.yaml (gitignored, docs/serving.md), read by
# every command; SERVE_ARGS adds one-off overrides, e.g. SERVE_ARGS="serve.inference_port=9080".
# After the pipeline, one line on its numerics: the reference bytes, or why this machine's differ
# (native profile, no AVX2, arm64, GPU) with each metric's delta against the commit.
run: data params
	@$(BIN)/python -m serve check $(SERVE_ARGS)
	$(BIN)/dvc repro
	@$(BIN)/python -m components.core.numerics
	@$(BIN)/python -m serve up $(SERVE_ARGS)

# Stop the local TorchServe started by `make run`.
stop:
	@$(BIN)/python -m serve down $(SERVE_ARGS)

# The experiments as one Markdown table: the headline metrics always, and whatever else differs
# between the experiments shown (plain `dvc exp show` lists every param and dependency hash).
EXPS_KEEP := ^(accuracy|balanced_accuracy|ece|gate|val\.loss)$$
EXPS_DROP := Created|State|Executor|step$$|.*/|data$$|conf$$|requirements\.lock
exps: setup
	@$(BIN)/dvc exp show --no-pager --md --only-changed --keep '$(EXPS_KEEP)' --drop '$(EXPS_DROP)' $(EXPS_ARGS)

# The tests scrape TorchServe with a real Prometheus (Debian package); installed once.
prometheus:
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)

# The numerics test trains on an emulated Intel CPU (qemu-user, Debian package); installed once.
emulator:
	@command -v qemu-x86_64 >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user)

test: data prometheus emulator
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Before every commit (under 2 minutes): the unit tier, every module's logic in-process, plus ruff,
# the import contracts and the docs check; `make test` also runs the integration and e2e tiers.
check: data
	$(BIN)/python -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

# Kubeflow Pipelines component images (CPU, GPU) with the locked dependencies, built from the
# committed tree (git archive HEAD: uncommitted changes never reach a cluster), tagged
# <repository>:<commit> (repositories from conf/pipeline); the compiled spec names them so.
image: setup
	@read -r cpu gpu <<< "$$($(BIN)/python -c 'from omegaconf import OmegaConf; i = OmegaConf.load("conf/pipeline/default.yaml").image; print(i.cpu_repository, i.gpu_repository)')"; \
	commit=$$(git rev-parse HEAD); \
	git archive --format=tar HEAD | docker build -f pipelines/Dockerfile --build-arg PIP_VERSION=$(PIP_VERSION) --build-arg GIT_COMMIT=$$commit -t $$cpu:$$commit - && \
	git archive --format=tar HEAD | docker build -f pipelines/Dockerfile.gpu --build-arg PIP_VERSION=$(PIP_VERSION) --build-arg GIT_COMMIT=$$commit -t $$gpu:$$commit - && \
	echo "built $$cpu:$$commit and $$gpu:$$commit; push them with: docker push $$cpu:$$commit && docker push $$gpu:$$commit"

# Re-resolve the environment from pyproject.toml and pin it again (maintainers only), in two
# files: requirements.lock, the runtime (what the component images install and what the lineage
# hashes), then requirements-test.lock, the test tools resolved on top of it (its `-c` line keeps
# every shared package at the runtime pin), so a test-tool bump never changes the runtime.
# (build/ is what setuptools leaves behind when pip installs the project.)
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet "pip==$(PIP_VERSION)"
	.lock-venv/bin/python -m pip install --quiet .
	( echo '# Exact runtime environment: the component images and `make setup` install it (generated with `make lock`; do not edit by hand).'; \
	  .lock-venv/bin/python -m pip freeze --all --exclude pip --exclude kfp-dvc-template ) > requirements.lock
	.lock-venv/bin/python -m pip install --quiet -c requirements.lock ".[test]"
	( echo '# Exact test tools on top of requirements.lock: `make setup` installs them, the images do not (generated with `make lock`; do not edit by hand).'; \
	  echo '-c requirements.lock'; \
	  .lock-venv/bin/python -m pip freeze --all --exclude pip --exclude kfp-dvc-template | grep -vxFf requirements.lock ) > requirements-test.lock
	rm -rf .lock-venv build

clean:
	rm -rf artifacts dvclive reports/*.json reports/*.html reports/*.md
