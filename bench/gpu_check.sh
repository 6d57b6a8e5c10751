#!/usr/bin/env bash
# bench/gpu_check.sh: the first look at a GPU, one call of about 8 minutes on one H100 or H200, one table.
#
#   bash bench/gpu_check.sh              # GPU: everything below, on the bundled sample
#   bash bench/gpu_check.sh --cpu        # a dry run at tiny shapes on CPU, no reference trainer (CI runs it)
#
# Stages, each with its own time limit; a stage that fails or runs out of time is reported and the rest run:
#   reference   the challenge's own baseline trainer (../shared/reference), sp1024 sample, 60 steps
#   baseline    ours with configs/baseline_2024.env (NGRAM=0 TTT=0), the same data and steps
#   stack_plain the competition preset at one GPU's share of the batch (65,536 tokens), NGRAM=0, sp8192 shards
#               built from the sample text (a tokenizer trained on it: timings, not scores, are comparable)
#   stack_mixer the same with the mixer on from the first step (NGRAM_TRAIN_START=0: its full cost) and a
#               gate-only fit after training (NGRAM_GATE_FIT_SECONDS: its steps per second), then the
#               evaluation of the whole 1.04M-token sample with the cache, the online gate and TTT (its time
#               split by phase) and the artifact's bytes
#   ngram_bench bench/ngram_bench.py: the table lookup's and the training call's CUDA rows, the masking twins
# Read the table: ms/step is the steady state (the second half of the train lines); "reference" against
# "baseline" is the same model and batch in both trainers; "stack_mixer" against "stack_plain" is the mixer's
# training cost at the competition's per-GPU batch; eval columns come from the run's eval_time line. Logs are
# kept in $OUT (default: a new folder under /tmp) for anything the table leaves out.
set -euo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SAMPLE=${SAMPLE_DATA_DIR:-$ROOT/../shared/data}
OUT=${OUT:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
cd "$OUT"
SP1024=(DATA_PATH="$SAMPLE/datasets/fineweb_sp1024_sample" TOKENIZER_PATH="$SAMPLE/tokenizers/fineweb_1024_bpe.model"
        VOCAB_SIZE=1024)
COMMON=(TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 WARMUP_STEPS=5 MAX_WALLCLOCK_SECONDS=0)
if [[ $MODE == gpu ]]; then
    STEPS=60
    VOCAB=8192
    SHARE=(TRAIN_BATCH_TOKENS=65536)
    EVAL_TOKENS=0
    GATE_FIT=10
    LIMIT=150
else
    # Tiny shapes: the code paths and the table, not the figures.
    STEPS=4
    VOCAB=512
    SHARE=(TRAIN_BATCH_TOKENS=2048 TRAIN_SEQ_LEN=64 NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=2 NUM_KV_HEADS=1
           LOOP_START=1 LOOP_END=1 PARALLEL_RESIDUAL_START=1 XSA_LAST_N=1 GPTQ_CALIB_BATCHES=2 VAL_BATCH_SIZE=4096
           EVAL_STRIDE=32 EVAL_CHUNK_TOKENS=1024 AUDIT_POSITIONS=8 OMP_NUM_THREADS=1)
    EVAL_TOKENS=8192
    GATE_FIT=2
    LIMIT=300
fi

# Stage NAME SECONDS CMD...: run CMD with a time limit, its output in NAME.out; never stops the script.
stage() {
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds}s)" >&2
    if timeout "$seconds" "$@" >"$name.out" 2>&1; then
        echo ok >"$name.status"
    else
        echo "failed:$?" >"$name.status"
        tail -5 "$name.out" >&2
    fi
}

# sp8192-style shards from the sample text: a tokenizer trained on the 901 val documents, val = those documents,
# train = the 200 other documents (the challenge's sp8192 shards are not bundled).
stage shards $LIMIT python "$ROOT/data/build_shards.py" "$SAMPLE/fineweb_sample/fineweb_val_head_901docs.jsonl" \
    --train-tokenizer $VOCAB --tokenizer "$OUT/tok/sp$VOCAB.model" --out-dir "$OUT/sp$VOCAB" --split val
stage shards_train $LIMIT python "$ROOT/data/build_shards.py" \
    "$SAMPLE/fineweb_sample/casefold_verify_docs_200.jsonl" \
    --tokenizer "$OUT/tok/sp$VOCAB.model" --out-dir "$OUT/sp$VOCAB" --split train
SPNEW=(DATA_PATH="$OUT/sp$VOCAB" TOKENIZER_PATH="$OUT/tok/sp$VOCAB.model" VOCAB_SIZE=$VOCAB)

if [[ $MODE == gpu ]]; then
    stage reference $LIMIT env "${SP1024[@]}" "${COMMON[@]}" ITERATIONS=$STEPS RUN_ID=reference \
        python "$ROOT/../shared/reference/challenge_baseline_train_gpt.py"
fi
baseline=$(grep -v '^#' "$ROOT/configs/baseline_2024.env" | grep -v '^DATA_PATH\|^TOKENIZER_PATH\|^VOCAB_SIZE')
# shellcheck disable=SC2046
stage baseline $LIMIT env $baseline "${SP1024[@]}" "${COMMON[@]}" ITERATIONS=$STEPS NGRAM=0 TTT=0 \
    VAL_MAX_TOKENS=$EVAL_TOKENS RUN_ID=baseline $([[ $MODE == cpu ]] && echo "${SHARE[@]}") python "$ROOT/train_gpt.py"
stage stack_plain $LIMIT env "${SPNEW[@]}" "${COMMON[@]}" "${SHARE[@]}" ITERATIONS=$STEPS NGRAM=0 \
    NGRAM_PREFILL_TOKENS=100000 VAL_MAX_TOKENS=65536 TTT=0 RUN_ID=stack_plain python "$ROOT/train_gpt.py"
stage stack_mixer $((LIMIT * 2)) env "${SPNEW[@]}" "${COMMON[@]}" "${SHARE[@]}" ITERATIONS=$STEPS NGRAM=1 \
    NGRAM_TRAIN_START=0 NGRAM_PREFILL_TOKENS=100000 NGRAM_GATE_FIT_SECONDS=$GATE_FIT VAL_MAX_TOKENS=$EVAL_TOKENS \
    EVAL_DUMP="$OUT/stack_mixer.npz" RUN_ID=stack_mixer \
    python "$ROOT/train_gpt.py"
if [[ $MODE == gpu ]]; then
    stage ngram_bench $LIMIT python "$ROOT/bench/ngram_bench.py" --device cuda
else
    stage ngram_bench $LIMIT python "$ROOT/bench/ngram_bench.py" --tokens 20000
fi

python "$ROOT/bench/gpu_check_table.py" "$OUT" "$MODE"
