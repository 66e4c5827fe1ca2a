#!/usr/bin/env bash
# What make docker-check (docker/check.sh) runs inside the image, through the Makefile's own run flags
# (make docker-train TRAIN_CMD='bash docker/check-inside.sh ...'), as a non-root uid:
#   compiled-train [WORKSPACE]  the demo's train stage with train.torch_compile: true on the CPU (inductor
#                               builds C++ with the image's compiler), run to a saved model twice: with the
#                               compile cache emptied, then from the cache a second run finds on the volume
#   claim-gpu HOLD              claim a GPU as every stage does, print it, and hold it while HOLD exists
set -euo pipefail

case "${1:-}" in
  compiled-train)
    cd "${2:-.demo}"
    python - <<'EOF'
import yaml

with open("params.yaml") as f:
    params = yaml.safe_load(f)
params["train"].update(torch_compile=True, max_steps=6, logging_steps=2, eval_steps=6, save_steps=6)
with open("compiled.yaml", "w") as f:
    yaml.safe_dump(params, f, sort_keys=False)
EOF
    rm -rf "${TORCHINDUCTOR_CACHE_DIR:?}"/* "${TRITON_CACHE_DIR:?}"/*
    for run in "cold (cache emptied)" "warm (from the cache)"; do
      rm -rf compiled
      start=$(date +%s)
      python -m pipeline.train --params compiled.yaml --out compiled/model --checkpoints compiled/checkpoints \
        --live-dir compiled/dvclive --metrics compiled/train.json
      [ -s compiled/model/model.safetensors ] || { echo "error: the compiled train stage saved no model" >&2; exit 1; }
      echo "compiled train stage, $run: $(( $(date +%s) - start )) s, to a saved model"
    done
    echo "compile cache: $(du -sh "$TORCHINDUCTOR_CACHE_DIR" | cut -f1) in $TORCHINDUCTOR_CACHE_DIR (the cache volume)"
    ;;
  claim-gpu)
    python - "${2:?the file to hold the GPU while it exists}" <<'EOF'
import os
import sys
import time
from pathlib import Path

from pipeline.core.device import claim_gpus, visible_gpus

print(f"uid {os.getuid()} claimed GPU {claim_gpus(dict(os.environ), 1, visible_gpus(), wait_s=0)} "
      f"of {visible_gpus()}", flush=True)
while Path(sys.argv[1]).exists():
    time.sleep(0.2)
EOF
    ;;
  *)
    echo "usage: $0 compiled-train [WORKSPACE] | claim-gpu HOLD" >&2
    exit 2
    ;;
esac
