# The pipeline on an NVIDIA GPU host, with the exact dependencies of requirements.lock.
# Build and run it through the Makefile: `make docker-build`, `make docker-train` (README, "GPU host").
# The repository is bind-mounted at /repo at run time (DVC needs .git); outputs land there, owned by you.
#
# Base: CUDA 13.0 "base" flavour, pinned by its exact tag. requirements.lock pins torch==2.13.0, whose
# PyPI wheel for Linux x86_64 is a CUDA 13.0 build that brings its own CUDA libraries as pip packages
# (cuda-toolkit 13.0.3, nvidia-cudnn-cu13 9.20, nvidia-nccl-cu13 2.29.7, triton 3.7.1). The larger
# runtime/cudnn flavours would only add a second CUDA copy that could disagree with those, and the
# pytorch/pytorch images a second torch that is not the lock's. The base flavour still carries the
# CUDA 13.0 driver-requirement labels the NVIDIA Container Toolkit checks: the host needs an NVIDIA
# driver >= 580 and the NVIDIA Container Toolkit.
# The base is a build argument so that `make docker-check` can build the rest of this file unchanged on
# a stand-in made from Debian's packages, on machines that cannot pull it (docs/docker.md); its default
# is the pinned CUDA base, which `make docker-build` uses.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Ubuntu 24.04's python3 is 3.12; git because DVC needs it, make for `make test` (docker-test),
# ca-certificates for HTTPS from git. g++ (which brings gcc and libc's headers) and python3-dev, because
# torch.compile compiles at run time: Triton builds its GPU launcher with `cc` against Python.h, and
# inductor's CPU code is C++ (what they add: docs/docker.md).
# DL3008 (pin apt versions) is ignored on purpose: Ubuntu's archive drops superseded versions, so
# exact pins break the build within weeks. The base image is pinned by tag and every Python
# package by requirements.lock; these OS tools do not change what the pipeline computes.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates g++ git make python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

# PEP 668: Ubuntu's python refuses system-wide pip installs, so the dependencies go into a venv on PATH.
# VENV and SKIP_SETUP tell the Makefile to use it instead of creating .venv (`make test` in docker-test).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    VENV=/opt/venv \
    SKIP_SETUP=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DVC_NO_ANALYTICS=1 \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    HOME=/home/app

WORKDIR /repo

# Dependencies before the source, so editing the code does not reinstall torch. The same lock as
# `make setup`: torch comes from it and nowhere else. pip is pinned to the version the lock was made and
# tested with (Ubuntu's venv ships 24.0). Two lock entries are sdists (antlr4-python3-runtime, future; pure
# Python) that pip builds in isolation, fetching setuptools from PyPI. torch's Linux-only CUDA packages
# are not in the lock (it is frozen on a CPU machine); torch and cuda-toolkit pin them exactly, except
# nvidia-nvjitlink and cuda-bindings (<14), which resolve when the image is built.
COPY requirements.lock ./
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir pip==26.3 \
 && pip install --no-cache-dir -r requirements.lock

# Runs as a non-root user. The Makefile runs it as your own uid:gid (--user) so files written into the
# mounted repo are yours; that uid has no /etc/passwd entry, so HOME (git and dvc need one) and the
# caches are world-writable with the sticky bit. The Makefile mounts a named volume at /cache, which
# copies these folders and permissions when it is new: models and datasets from the Hub, and what
# torch.compile built (inductor's and Triton's kernels), are kept from one run to the next.
# safe.directory: git (and DVC's libgit2) refuse a repository owned by another uid, which is what /repo
# is when the container runs without --user.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /home/app --shell /bin/bash app \
 && mkdir -p /home/app /cache/huggingface /cache/torchinductor /cache/triton \
 && chmod 1777 /home/app /cache /cache/huggingface /cache/torchinductor /cache/triton \
 && git config --system --add safe.directory /repo

# The small source last, so the image also works without the mount (python -m pipeline.<stage>);
# never data or models (.dockerignore).
COPY pyproject.toml Makefile Dockerfile README.md dvc.yaml params.yaml .dvcignore ./
COPY .dvc/config .dvc/config
COPY pipeline/ pipeline/
COPY examples/ examples/
COPY tests/ tests/

USER 10001:10001
CMD ["dvc", "repro"]
