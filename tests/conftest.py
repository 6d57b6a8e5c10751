"""Shared pytest fixtures: where the bundled sample data lives.

Run all tests with:  python -m pytest -q tests
The sample data is read from ../shared/data (beside the repo) or from $SAMPLE_DATA_DIR.
"""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from devkit import (SAMPLE_DATA_DIR, SAMPLE_SHARDS, SAMPLE_TOKENIZER, SAMPLE_TRAIN_SHARD,  # noqa: E402,F401
                    SAMPLE_VAL_SHARD, log_fields)


@pytest.fixture
def one_torch_thread():
    """For tests of small tensors: on a shared 2-core machine OpenMP's barriers make 2 threads ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_val_tokens():
    """The sample val shard's tokens as a 1-D int64 torch tensor (1,040,060 tokens)."""
    import numpy as np
    import torch

    raw = np.fromfile(SAMPLE_VAL_SHARD, dtype="<u2", offset=256 * 4)
    return torch.from_numpy(raw.astype(np.int64))


# Every switch of the model stack off: a GPT of these settings is the March baseline's model, without the mixer.
BASELINE_MODEL = dict(mlp_negative_slope=0.0, rope_dims=0, ln_scale=False, skip_gates=False,
                      parallel_residual_start=-1, xsa_last_n=0, num_loops=0, smear_gate_enabled=False,
                      sparse_attn_gate_enabled=False, ngram=False)


def model_args(**settings):
    """train_gpt.Hyperparameters (the defaults) with `settings` set by attribute name; an unknown name raises."""
    import train_gpt

    args = train_gpt.Hyperparameters()
    for name, value in settings.items():
        if not hasattr(args, name):
            raise AttributeError(f"train_gpt.Hyperparameters has no attribute {name!r}")
        setattr(args, name, value)
    return args


# A trainer configuration small enough for tests: seconds per run on 2 CPU cores.
TINY_ENV = dict(
    DATA_PATH=str(SAMPLE_SHARDS), TOKENIZER_PATH=str(SAMPLE_TOKENIZER), NUM_LAYERS="2", MODEL_DIM="64",
    NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="2048", ITERATIONS="4",
    WARMUP_STEPS="0", MAX_WALLCLOCK_SECONDS="0", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0",
    VAL_BATCH_SIZE="4096", VAL_MAX_TOKENS="4096", EVAL_STRIDE="32", EVAL_CHUNK_TOKENS="1024",
    NGRAM_PREFILL_TOKENS="50000", NGRAM_TRAIN_START="0", TTT_EPOCHS="1", AUDIT_POSITIONS="32", SEED="1337",
    # The sample is sp1024; a 2-block model loops block 1 once from mid-run; int8 + zstd keeps the baseline's
    # artifact name (int8_zstd) that the log tests read. tests/test_model_stack.py runs the default export.
    VOCAB_SIZE="1024", WARMDOWN_FRAC="0.5", LOOP_START="1", LOOP_END="1", NUM_LOOPS="1", ENABLE_LOOPING_AT="0.5",
    PARALLEL_RESIDUAL_START="1", QUANT_BITS="8", GPTQ_CALIB_BATCHES="0", COMPRESSOR="zstd",
)


def run_trainer(workdir, nproc: int = 0, script=None, **overrides):
    """Run train_gpt.py in `workdir` with TINY_ENV + overrides, as `python` (nproc=0) or `torchrun --nproc_per_node`.
    Returns (CompletedProcess, log text or '' when no log was written)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    env.update(TINY_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    script = str(script or REPO_ROOT / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    log = Path(workdir) / "logs" / f"{env.get('RUN_ID', '')}.txt"
    return proc, (log.read_text() if env.get("RUN_ID") and log.is_file() else "")


def log_value(log: str, line_prefix: str, key: str) -> float:
    """The float after `key:` on the last log line starting with `line_prefix`."""
    return log_fields(log, line_prefix)[key]
