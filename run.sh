#!/usr/bin/env bash
# run.sh: train once per seed, then package the logs as a record folder (records/package.py).
#
#   RECORD_NAME=NgramMixer AUTHOR="Jane Doe" GITHUB_ID=janedoe BLURB="Exact n-gram mixer + TTT" \
#       PACKAGE_ARGS="--sota-val-bpb 1.0611" bash run.sh                         # 3 seeds on 8xH100
#   SEEDS="1337" RECORD_NAME=Try1 AUTHOR=me PACKAGE_ARGS=--non-record bash run.sh  # one seed, non-record track
#   set -a; . configs/sample_cpu.env; set +a
#   NPROC=1 SEEDS="1 2" RECORD_NAME=CpuDemo AUTHOR=me PACKAGE_ARGS=--non-record bash run.sh   # CPU demo
#
# Every other environment variable reaches train_gpt.py unchanged (its Hyperparameters). Each seed runs with
# SEED=<seed> RUN_ID=${RUN_NAME}_seed<seed>, so its log is logs/<RUN_ID>.txt under the current directory (run from
# the repo root). The first failed seed stops the script with that seed's exit code and nothing is packaged.
# PACKAGE_ARGS is split on spaces and passed to records/package.py (--sota-val-bpb X: the current record's val_bpb,
# required for the record track; --non-record; --out-root DIR; --date YYYY-MM-DD). The record track needs >= 3
# seeds on 8xH100 with VAL_MAX_TOKENS=0; anything else needs --non-record.
set -euo pipefail

SEEDS=${SEEDS:-"1337 42 2025"}
NPROC=${NPROC:-8}
# A timestamp keeps reruns from colliding: the trainer refuses an existing log or artifact.
RUN_NAME=${RUN_NAME:-run_$(date +%Y%m%d-%H%M%S)}
# Checked before training, so a missing name does not cost a full set of runs.
: "${RECORD_NAME:?set RECORD_NAME (the record folder is <date>_<RECORD_NAME>)}"
: "${AUTHOR:?set AUTHOR (and GITHUB_ID) for submission.json}"
GITHUB_ID=${GITHUB_ID:-}
BLURB=${BLURB:-}
PACKAGE_ARGS=${PACKAGE_ARGS:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

logs=()
for seed in $SEEDS; do
  run_id="${RUN_NAME}_seed${seed}"
  echo "run.sh: seed ${seed} -> logs/${run_id}.txt"
  status=0
  SEED="$seed" RUN_ID="$run_id" torchrun --standalone --nproc_per_node="$NPROC" "$ROOT/train_gpt.py" || status=$?
  if (( status != 0 )); then
    echo "run.sh: seed ${seed} failed with exit code ${status}; stopping, nothing packaged" >&2
    exit "$status"
  fi
  logs+=("logs/${run_id}.txt")
done

# shellcheck disable=SC2086  # PACKAGE_ARGS is meant to split into flags
python "$ROOT/records/package.py" "${logs[@]}" --name "$RECORD_NAME" --author "$AUTHOR" \
  --github-id "$GITHUB_ID" --blurb "$BLURB" $PACKAGE_ARGS
