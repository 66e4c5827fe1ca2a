# Two commands for a newcomer: `make demo` and `make test`. Each sets itself up (make setup) on a
# fresh machine. `make help` lists every target.
PYTHON ?= python3
# VENV and SKIP_SETUP=1 are set by the Docker image, whose dependencies are already in /opt/venv:
# there `make test` uses that venv instead of creating .venv and installing everything again.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup check-venv demo demo-classify test test-scale lint bench repro plots params publish compare verify-remote clean docker-build docker-train \
	docker-shell docker-test docker-demo docker-check docker-gpu-locks

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(if $(filter 1,$(SKIP_SETUP)),check-venv,$(STAMP)) ## Create .venv and install the pinned dependencies (requirements.lock)

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/python -m pipeline.tools.plots
	touch $@

check-venv:
	@test -x $(BIN)/python || { echo "error: SKIP_SETUP=1 but $(BIN)/python does not exist: set VENV to a venv with requirements.lock installed, or unset SKIP_SETUP" >&2; exit 2; }

demo: setup ## Run the whole pipeline offline on a tiny GPT-2 (about 2 minutes on 2 CPU cores)
	$(BIN)/python -m pipeline.tools.demo

demo-classify: setup ## The same, as a text classifier: standard library docstrings by module family
	$(BIN)/python -m pipeline.tools.demo --workdir .demo-classify --overrides examples/data/classification.yaml

test: setup lint ## Run the linter and the test suite, offline
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest

test-scale: setup ## Runs past one process or machine: ZeRO-3, two hosts, real kills, queued experiments, DVC remotes (sshd, S3)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "scale or remote"

lint: setup ## ruff over pipeline/ and tests/, hadolint over the Dockerfile
	$(BIN)/ruff check pipeline tests
	$(BIN)/hadolint Dockerfile

bench: setup ## Benchmark the stages against their peers, side by side (CPU: ~15 minutes; GPU: docs/speed.md; BENCH_QUICK=1: the GPU headline alone)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/classify.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/generate.py

repro: setup ## The real job: dvc repro (needs the Hugging Face Hub; a GPU is recommended)
	$(BIN)/dvc repro

plots: setup ## dvc plots show, rendered offline (the page: dvc_plots/index.html)
	test -f .dvc/plots/offline.html || $(BIN)/python -m pipeline.tools.plots
	$(BIN)/dvc plots show

params: setup ## Check params.yaml and print every parameter with its help
	$(BIN)/python -m pipeline.tools.params --help-params
	$(BIN)/python -m pipeline.tools.params

compare: setup ## Markdown report of the workspace (or EXP=name) against REV (default HEAD, or the experiment's baseline): compare/report.md
	$(BIN)/python -m pipeline.tools.compare $(if $(REV),--rev $(REV)) $(if $(EXP),--exp $(EXP)) $(if $(OUT),--out $(OUT))

verify-remote: setup ## Check the DVC remote's (REMOTE=name) copies of the outputs byte for byte; DELETE=1 removes damaged ones
	$(BIN)/python -m pipeline.tools.remote $(if $(REMOTE),--remote $(REMOTE)) $(if $(filter 1,$(DELETE)),--delete)

publish: setup ## Push models/finetuned to the Hub repo publish.repo_id (needs HF_TOKEN; never part of dvc repro)
	$(BIN)/python -m pipeline.tools.publish

clean: ## Remove the demo workspace and caches (not .venv, not DVC outputs)
	rm -rf .demo .demo-classify .pytest_cache
	find . -name __pycache__ -not -path './.venv/*' -exec rm -rf {} +

# --- Docker, for a GPU host (README, "GPU host"; docs/docker.md) ----------------------------------------
# Override any of these on the command line (make docker-train GPUS=2, DOCKER=podman); the environment does
# not change them. Recursive (=), so the git, sed and id calls run only when a docker target needs them.
DOCKER          = docker
IMAGE           = gpt2-pipeline
# Empty: the Dockerfile's own pinned CUDA base. docker-check sets a stand-in built from Debian's packages.
BASE_IMAGE      =
VERSION         = $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n 1)
GIT_SHA         = $(shell git rev-parse --short HEAD 2>/dev/null)
# A Docker tag allows [A-Za-z0-9_.-]: a PEP 440 local version's "+" becomes "_".
TAG             = $(subst +,_,$(VERSION))$(if $(GIT_SHA),-$(GIT_SHA))
# A named volume at /cache: the Hub's models and datasets (HF_HOME) and torch.compile's kernels, kept
# from one run to the next (the Dockerfile's ENV names the folders).
CACHE_VOLUME    = gpt2-pipeline-cache
# The per-GPU locks (pipeline.core.device.claim_gpus), one host folder for every container and every
# user, mounted at its own path: the same files as a run on the bare host (TMPDIR unset) uses.
GPU_LOCK_DIR    = /tmp/gpt2-pipeline-gpus
DOCKER_USER     = $(shell id -u):$(shell id -g)
# GPUs given to the container; `make docker-test GPU_FLAGS=` runs the image on a host without one. Podman
# (4.x has no --gpus) takes them as a CDI device: `nvidia-ctk cdi generate` on the host makes it known.
GPU_FLAGS       = $(if $(filter podman,$(notdir $(DOCKER))),--device nvidia.com/gpu=all,--gpus all)
# Without GPU_FLAGS the CUDA image still says there are GPUs (NVIDIA_VISIBLE_DEVICES), and the stages
# refuse to run on the CPU unless asked: GPU_FLAGS= is that request.
CPU_FLAGS       = $(if $(strip $(GPU_FLAGS)),,-e PIPELINE_ALLOW_CPU=1)
# GPUS > 1: the train stage re-launches itself through torchrun with that many processes (NPROC_PER_NODE).
GPUS            = 1
# NODES > 1: one run across hosts (docs/scaling.md). Run the same make line on every host with its own
# NODE_RANK: node 0 runs the pipeline (dvc repro, EXP, RECIPE), the others the train stage alone, which
# waits at the rendezvous (RDZV_ENDPOINT, node 0's address:port) for node 0 to reach it. The repo must be
# on a file system every host shares. NODE_ADDR: this host's address, where the hostname does not resolve.
NODES           = 1
NODE_RANK       = 0
RDZV_ENDPOINT   =
NODE_ADDR       =
# InfiniBand, where the host has it: NCCL between hosts needs its devices, and locked (pinned) memory
# without a limit for RDMA (docs/scaling.md).
INFINIBAND      = $(wildcard /dev/infiniband)
NODE_FLAGS      = $(if $(filter-out 1,$(NODES)),--network host -e NNODES=$(NODES) -e NODE_RANK=$(NODE_RANK) \
	-e RDZV_ENDPOINT=$(RDZV_ENDPOINT) $(if $(strip $(NODE_ADDR)),-e NODE_ADDR=$(NODE_ADDR)) \
	-e RDZV_ID=gpt2-$(GIT_SHA) \
	$(if $(strip $(INFINIBAND)),--device $(INFINIBAND) --ulimit memlock=-1:-1 --cap-add IPC_LOCK))
# EXP='-S lr=5e-4' runs `dvc exp run -S lr=5e-4` instead of `dvc repro`; RECIPE=examples/gpu.yaml runs
# that override file as an experiment (checked and expanded in the container), EXP's flags after it.
EXP             =
RECIPE          =
PIPELINE_CMD    = $(if $(strip $(RECIPE)),python -m pipeline.tools.recipe $(RECIPE) --run $(EXP),$(if $(strip $(EXP)),dvc exp run $(EXP),dvc repro))
TRAIN_CMD       = $(if $(filter-out 0,$(NODE_RANK)),python -m pipeline.train,$(PIPELINE_CMD))

# `dvc exp run` commits: the container uses your git identity (git config user.name / user.email).
docker-train docker-shell docker-test docker-demo: export GIT_AUTHOR_NAME     ?= $(shell git config user.name 2>/dev/null)
docker-train docker-shell docker-test docker-demo: export GIT_COMMITTER_NAME  ?= $(shell git config user.name 2>/dev/null)
docker-train docker-shell docker-test docker-demo: export GIT_AUTHOR_EMAIL    ?= $(shell git config user.email 2>/dev/null)
docker-train docker-shell docker-test docker-demo: export GIT_COMMITTER_EMAIL ?= $(shell git config user.email 2>/dev/null)
# Passed by name only (`-e NAME`: docker reads the value from this environment), and only when set, so a
# value never shows on the command line and no token or key enters the image. The AWS_* variables are an
# S3-compatible DVC remote's credentials (docs/sharing.md), for dvc push/pull in the container.
SECRETS  = HF_TOKEN AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_DEFAULT_REGION
PASS_ENV = $(strip $(foreach v,$(SECRETS) GIT_AUTHOR_NAME GIT_AUTHOR_EMAIL GIT_COMMITTER_NAME GIT_COMMITTER_EMAIL,$(if $($(v)),-e $(v))))

# The flags every docker target shares. The repo is mounted where the image expects it (DVC needs .git)
# and the container runs as you, so what it writes there is yours; models and datasets from the Hub
# go to a named volume and download once per host, and what torch.compile built is reused. The GPU
# locks' host folder is shared by every container. --ipc=host: the DataLoader's and NCCL's shared
# memory; --init: signals reach dvc and torchrun, and their child processes are reaped.
# Rootless podman maps container uids into your subuid range: keep-id makes the container's uid yours, so
# files in the mounted repo stay yours (rootful podman and docker need nothing).
USERNS = $(if $(filter podman,$(notdir $(DOCKER))),$(if $(filter 0,$(shell id -u)),,--userns=keep-id))
DOCKER_RUN = $(DOCKER) run --rm --init $(GPU_FLAGS) $(CPU_FLAGS) --ipc=host \
	-v "$(CURDIR):/repo" -w /repo -v $(CACHE_VOLUME):/cache \
	-v "$(GPU_LOCK_DIR):$(GPU_LOCK_DIR)" -e GPU_LOCK_DIR=$(GPU_LOCK_DIR) \
	--user $(DOCKER_USER) $(USERNS) -e NPROC_PER_NODE=$(GPUS) $(NODE_FLAGS) $(PASS_ENV)

# A bad GPUS stops make before anything runs (under make -n too): one word, digits only, no leading 0.
digits-removed = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
GPUS_VALID = $(and $(filter 1,$(words $(GPUS))),$(if $(call digits-removed,$(GPUS)),,yes),$(filter-out 0%,$(GPUS)))
ifneq ($(filter docker-%,$(MAKECMDGOALS)),)
  ifeq ($(GPUS_VALID),)
    $(error GPUS must be a whole number >= 1, the GPUs to train on (e.g. GPUS=2); got '$(GPUS)')
  endif
  ifneq ($(and $(filter-out 1,$(NODES)),$(if $(strip $(RDZV_ENDPOINT)),,yes)),)
    $(error NODES=$(NODES) needs RDZV_ENDPOINT=host:port, node 0's address where the hosts meet (e.g. 10.0.0.1:29400))
  endif
endif

docker-build: ## Build the GPU image, tagged gpt2-pipeline:<version>-<git sha> (DOCKER=podman works too)
	$(DOCKER) build --tag $(IMAGE):$(TAG) $(if $(strip $(BASE_IMAGE)),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

# The GPU locks' folder, world-writable and sticky as /tmp is (mkdir -m is not cut by the umask): the
# runs of every user add their lock files to it. Made here: docker would make a missing one root's.
docker-gpu-locks:
	mkdir -p -m 1777 "$(GPU_LOCK_DIR)"

docker-train: docker-build docker-gpu-locks ## dvc repro on the GPUs in the image (EXP='-S lr=5e-4' or RECIPE=file: an experiment; GPUS=N, NODES=N: torchrun)
	$(DOCKER_RUN) $(IMAGE):$(TAG) $(TRAIN_CMD)

docker-shell: docker-build docker-gpu-locks ## An interactive shell in the image, with the same mounts
	$(DOCKER_RUN) -it $(IMAGE):$(TAG) bash

docker-test: docker-build docker-gpu-locks ## make test inside the image
	$(DOCKER_RUN) $(IMAGE):$(TAG) make test

docker-demo: docker-build docker-gpu-locks ## make demo inside the image (GPU_FLAGS= on a host without a GPU)
	$(DOCKER_RUN) $(IMAGE):$(TAG) make demo

# Machines without Docker or the CUDA base (like the project's own): build the image with podman on a
# stand-in base made from Debian's packages, then run the demo and the tests inside, as a non-root uid.
docker-check: ## Build and check the image without a Docker daemon or GPU (podman, debootstrap; docs/docker.md)
	DOCKER="$(if $(filter command line,$(origin DOCKER)),$(DOCKER),podman)" IMAGE="$(IMAGE)" TAG="$(TAG)" \
		bash docker/check.sh
