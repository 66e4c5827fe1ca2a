#!/usr/bin/env bash
# make docker-check: the image built and run where there is no Docker daemon and the CUDA base cannot be
# pulled (the project's own machines, CI). With podman and Debian's debootstrap it
#   1. makes a stand-in base image of a Debian release from Debian's packages (kept for the next run),
#   2. builds the unchanged Dockerfile on it (make docker-build BASE_IMAGE=...),
#   3. runs the demo inside as a non-root uid with a copy of this repo bind-mounted (make docker-demo), and
#      checks its outputs and that the uid owns every one,
#   4. runs the demo's train stage again with torch.compile on the CPU, cold and then from the compile cache
#      on the cache volume (docker/check-inside.sh), to a saved model: the image's compiler works,
#   5. starts two containers as two uids, each given two fake GPUs, and checks that they claim different
#      ones through the GPU locks' host folder the Makefile mounts into both,
#   6. runs the test suite inside (make docker-test),
# printing each step's time, what it downloaded (all of this machine's network traffic meanwhile) and the
# disk used. What the stand-in proves and what it cannot: docs/docker.md.
#
# Settings (environment): DOCKER (podman), IMAGE (gpt2-pipeline), STANDIN_RELEASE (bookworm), STANDIN_MIRROR
# (http://deb.debian.org/debian), CHECK_UID (1234), CHECK_DISK_GB (free space it needs, 30), CONTAINERS_CONF
# (default docker/containers.conf: runc and explicit ulimits, which sandboxed machines need).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
DOCKER=${DOCKER:-podman}
IMAGE=${IMAGE:-gpt2-pipeline}
RELEASE=${STANDIN_RELEASE:-bookworm}
MIRROR=${STANDIN_MIRROR:-http://deb.debian.org/debian}
CHECK_UID=${CHECK_UID:-1234}
OTHER_UID=$((CHECK_UID + 1))  # the second user of step 5
NEED_GB=${CHECK_DISK_GB:-30}
BASE=localhost/gpt2-pipeline-standin:$RELEASE
HOST_CA=/etc/ssl/certs/ca-certificates.crt  # HTTPS may go through this machine's own CA: the stand-in trusts it
started=$(date +%s)

fail() { echo "error: docker-check: $*" >&2; exit 2; }
say() { echo "docker-check: $*" >&2; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }
free_gb() { df -Pk "$1" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }
received() { awk -F'[: ]+' 'NR > 2 && $2 != "lo" { sum += $3 } END { printf "%.0f", sum }' /proc/net/dev; }
downloaded() { awk -v a="$1" -v b="$(received)" 'BEGIN { printf "%.2f GB", (b - a) / 1e9 }'; }

# --- what it needs, refused in one line before anything starts -------------------------------------------
for tool in "$DOCKER" debootstrap tar git make; do
  command -v "$tool" >/dev/null || fail "$tool is not installed; on Debian or Ubuntu: apt-get install podman debootstrap runc"
done
[ "$(id -u)" = 0 ] || fail "debootstrap and the uid $CHECK_UID files need root; run it as root (sudo make docker-check)"
if [ "$(basename "$DOCKER")" = podman ]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$root/docker/containers.conf}
  command -v runc >/dev/null || fail "runc is not installed (docker/containers.conf runs podman with it): apt-get install runc"
  store=$("$DOCKER" info --format '{{.Store.GraphRoot}}' 2>/dev/null) || fail "$DOCKER does not start: run '$DOCKER info' to see why"
else
  store=$("$DOCKER" info --format '{{.DockerRootDir}}' 2>/dev/null) || fail "$DOCKER does not answer: is its daemon running?"
fi
mkdir -p "$store"
tmp=${TMPDIR:-/tmp}
for place in "$store" "$tmp"; do
  free=$(free_gb "$place")
  [ "$free" -ge "$NEED_GB" ] || fail "$place has $free GB free and the check needs $NEED_GB GB (the build's layers and wheels); free some space, or set TMPDIR / the container storage elsewhere"
done
free_before=$(free_gb "$store")
work=$(mktemp -d "$tmp/docker-check.XXXXXX")
# the lowest free space seen on the storage's disk, every 5 s: the check's peak use
(while sleep 5; do free_gb "$store"; echo; done) >"$work/free.log" 2>/dev/null &
sampler=$!
trap 'kill "$sampler" 2>/dev/null; rm -rf "$work"' EXIT

# --- 1. the stand-in base ------------------------------------------------------------------------------
step=$(date +%s) rx=$(received)
if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  say "stand-in base $BASE: reused"
else
  debootstrap --variant=minbase "$RELEASE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap $RELEASE from $MIRROR failed (its end is above)"; }
  mkdir -p "$work/rootfs/etc/ssl"
  [ -f "$HOST_CA" ] && cp "$HOST_CA" "$work/rootfs/etc/ssl/host-ca.crt"
  tar -C "$work/rootfs" -c . | "$DOCKER" import --change 'ENV PIP_CERT=/etc/ssl/host-ca.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/host-ca.crt' --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/host-ca.crt' \
    --change 'CMD ["bash"]' - "$BASE" >"$work/import.log" 2>&1 \
    || { cat "$work/import.log" >&2; fail "$DOCKER import of the stand-in base failed (its output is above)"; }
  rm -rf "$work/rootfs"
  say "stand-in base $BASE: Debian $RELEASE minbase from $MIRROR ($(elapsed "$step"), $(downloaded "$rx") downloaded)"
fi

# --- the repository as it is now (tracked and new files, not ignored ones), owned by the check's uid ------
mkdir -p "$work/repo"
git -C "$root" ls-files -z --cached --others --exclude-standard \
  | tar -C "$root" --null -T - --ignore-failed-read -c 2>/dev/null | tar -C "$work/repo" -x  # deleted files: skipped
cp -a "$root/.git" "$work/repo/.git"
chown -R "$CHECK_UID:$CHECK_UID" "$work/repo"
tag=${TAG:?the Makefile passes the image tag}  # git refuses to read the copy that uid $CHECK_UID owns
mkdir -m 1777 "$work/gpu-locks"  # the check's own, not this host's /tmp/gpt2-pipeline-gpus
flags=(-C "$work/repo" --no-print-directory DOCKER="$DOCKER" IMAGE="$IMAGE" TAG="$tag" BASE_IMAGE="$BASE" GPU_FLAGS=
       DOCKER_USER="$CHECK_UID:$CHECK_UID" CACHE_VOLUME=gpt2-pipeline-check-cache GPU_LOCK_DIR="$work/gpu-locks")

# --- 2. the image ----------------------------------------------------------------------------------------
step=$(date +%s) rx=$(received)
make "${flags[@]}" docker-build >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; fail "the image build failed (its end is above)"; }
size=$("$DOCKER" image inspect --format '{{.Size}}' "$IMAGE:$tag" | awk '{ printf "%.1f GB", $1 / 1e9 }')
inside=$("$DOCKER" run --rm "$IMAGE:$tag" sh -c 'python --version && python -c "import torch; print(\"torch\", torch.__version__)" && pip check >/dev/null && echo "pip check: clean"' 2>&1 | paste -sd ' ' -) \
  || fail "the image was built but its Python does not start or pip check fails: $inside"
say "image $IMAGE:$tag on $BASE: $size, built in $(elapsed "$step") ($(downloaded "$rx") downloaded); inside: $inside (the real base, Ubuntu 24.04, has Python 3.12)"

# --- 3. the demo, as uid $CHECK_UID, the repo bind-mounted ----------------------------------------------
step=$(date +%s)
make "${flags[@]}" docker-demo >"$work/demo.log" 2>&1 || { tail -n 30 "$work/demo.log" >&2; fail "make demo failed inside the image (its end is above)"; }
[ -s "$work/repo/.demo/metrics/summary.json" ] || fail "the demo ran but wrote no .demo/metrics/summary.json"
others=$(find "$work/repo/.demo" ! -uid "$CHECK_UID" | head -n 3)
[ -z "$others" ] || fail "files the demo wrote are not owned by uid $CHECK_UID: $others"
say "demo inside the image as uid $CHECK_UID: $(elapsed "$step"), every output owned by $CHECK_UID"
grep -E '^(perplexity|training:)' "$work/demo.log" | sed 's/^/  /' >&2

# --- 4. torch.compile inside: the demo's train stage, compiled on the CPU by inductor with the image's g++ ------
step=$(date +%s)
make "${flags[@]}" docker-train TRAIN_CMD="bash docker/check-inside.sh compiled-train" >"$work/compile.log" 2>&1 \
  || { tail -n 30 "$work/compile.log" >&2; fail "the compiled train stage failed inside the image (its end is above)"; }
say "torch.compile inside the image as uid $CHECK_UID: $(elapsed "$step")"
grep -E '^(compiled train stage|compile cache)' "$work/compile.log" | sed 's/^/  /' >&2

# --- 5. GPU claims across containers and users: two fake GPUs each, the locks' folder mounted into both -------
step=$(date +%s)
fake_gpus="--device /dev/null:/dev/nvidia0 --device /dev/null:/dev/nvidia1"
touch "$work/repo/.hold-gpu"
make "${flags[@]}" GPU_FLAGS="$fake_gpus" docker-train TRAIN_CMD="bash docker/check-inside.sh claim-gpu .hold-gpu" \
  >"$work/claim-1.log" 2>&1 &
first=$!
for _ in $(seq 600); do grep -q '^uid .* claimed' "$work/claim-1.log" && break; kill -0 "$first" 2>/dev/null || break; sleep 0.2; done
make "${flags[@]}" GPU_FLAGS="$fake_gpus" DOCKER_USER="$OTHER_UID:$OTHER_UID" docker-train \
  TRAIN_CMD="bash docker/check-inside.sh claim-gpu .no-hold" >"$work/claim-2.log" 2>&1 || true
rm -f "$work/repo/.hold-gpu"
wait "$first" || true
claims=$(grep -h '^uid .* claimed' "$work/claim-1.log" "$work/claim-2.log" || true)
[ "$(echo "$claims" | grep -c claimed)" = 2 ] && [ "$(echo "$claims" | sed 's/.*claimed //' | sort -u | wc -l)" = 2 ] \
  || { tail -n 20 "$work/claim-1.log" "$work/claim-2.log" >&2; fail "two containers did not claim different GPUs: ${claims:-none claimed} (their logs' ends are above)"; }
say "GPU claims: two containers, uids $CHECK_UID and $OTHER_UID, one lock folder: $(echo "$claims" | paste -sd ';' - | sed 's/;/; /') ($(elapsed "$step"))"

# --- 6. the test suite inside ------------------------------------------------------------------------------
step=$(date +%s)
make "${flags[@]}" docker-test >"$work/test.log" 2>&1 || { tail -n 40 "$work/test.log" >&2; fail "make test failed inside the image (its end is above)"; }
say "make test inside the image: $(elapsed "$step"): $(grep -E '^=+ .*(passed|failed).* =+$' "$work/test.log" | tail -n 1 | tr -d '=')"

lowest=$(sort -n "$work/free.log" | head -n 1)
say "passed in $(elapsed "$started"); disk of $store: $free_before GB free before, $(free_gb "$store") GB after, at most $(( free_before - ${lowest:-$free_before} )) GB used at once (images kept for the next run: $DOCKER image rm $IMAGE:$tag $BASE)"
