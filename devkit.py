"""devkit.py: what the tools around a run share (tests, benches, records/, analysis/): where the bundled sample
data lives and how to read a train_gpt.py log. train_gpt.py never imports it: a run needs neither.

  from devkit import SAMPLE_SHARDS, SAMPLE_TOKENIZER, parse_log, log_fields
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent

# -----------------------------
# SAMPLE DATA
# -----------------------------
# The bundled sample (read-only) sits in ../shared/data beside the repo, or wherever $SAMPLE_DATA_DIR points.

SAMPLE_DATA_DIR = Path(os.environ.get("SAMPLE_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()
SAMPLE_SHARDS = SAMPLE_DATA_DIR / "datasets" / "fineweb_sp1024_sample"
SAMPLE_VAL_SHARD = SAMPLE_SHARDS / "fineweb_val_000000.bin"
SAMPLE_TRAIN_SHARD = SAMPLE_SHARDS / "fineweb_train_000000.bin"
SAMPLE_TOKENIZER = SAMPLE_DATA_DIR / "tokenizers" / "fineweb_1024_bpe.model"


def read_env_file(path: Path) -> dict[str, str]:
    """The NAME=value lines of a configs/*.env file, with ${SAMPLE_DATA_DIR:-../shared/data} resolved."""
    env = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value.replace("${SAMPLE_DATA_DIR:-../shared/data}", str(SAMPLE_DATA_DIR))
    return env


# -----------------------------
# LOG PARSING
# -----------------------------
# The log file starts with the trainer's own source, which holds these formats inside f-strings. Patterns are
# anchored at the line start and every field must be a number, so only lines the trainer printed can match.

NUM = r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
RE_RUN_ID = re.compile(r"^run_id:(\S+)$")
RE_HPARAM = re.compile(r"^hparam (\w+):(.*)$")
RE_HARDWARE = re.compile(r"^Running Python \S+, PyTorch \S+, (.+)$")
RE_WORLD = re.compile(r"^world_size:(\d+) grad_accum_steps:\d+ device:\S+ torch:\S+ compile:(?:True|False)$")
RE_CODE_SHA = re.compile(r"^code_sha256:([0-9a-f]{64})$")
RE_TRAIN = re.compile(rf"^step:(\d+)/\d+ train_loss:{NUM} train_time:({NUM})ms step_avg:({NUM})ms(?: mix_nll:{NUM})?$")
RE_VAL = re.compile(rf"^step:(\d+)/\d+ val_loss:{NUM} val_bpb:({NUM}) train_time:({NUM})ms step_avg:({NUM})ms$")
RE_STOPPED = re.compile(r"^stopping_early: wallclock_cap train_time:\d+ms step:\d+/\d+$")
RE_CODE_BYTES = re.compile(r"^Code size: (\d+) bytes$")
RE_TOTAL_BYTES = re.compile(r"^Total submission size (\w+): (\d+) bytes$")
RE_OVER_CAP = re.compile(r"^ARTIFACT_OVER_CAP total:\d+ cap:\d+$")
RE_ROUNDTRIP = re.compile(rf"^final_\w+_roundtrip val_loss:{NUM} val_bpb:{NUM} eval_time:({NUM})ms$")
RE_AUDIT = re.compile(rf"^legality_audit positions:(\d+) max_abs_sum_err:({NUM}) max_gold_err:({NUM})$")
RE_AUDIT_FAILED = re.compile(r"^LEGALITY_AUDIT_FAILED")
RE_EVAL_TOTAL = re.compile(rf"^eval_time (?:\w+:{NUM}ms )*total:({NUM})ms$")
RE_EXACT = re.compile(rf"^(final_ngram_ttt_exact|final_\w+_roundtrip_exact) val_loss:({NUM}) val_bpb:({NUM})$")


@dataclass
class RunLog:
    """What one train_gpt.py log says; a field is None (or empty) where the log lacks its line."""
    path: Path
    run_id: str | None = None
    hparams: dict[str, str] = field(default_factory=dict)
    hardware: str | None = None
    world_size: int | None = None
    code_sha256: str | None = None
    steps: int | None = None
    step_avg_ms: float | None = None
    # train_time of the last step line; it includes the n-gram prefill.
    train_time_ms: float | None = None
    stopped_early: bool = False
    # (train_time_ms, val_bpb) of every step:N val line.
    val_curve: list[tuple[float, float]] = field(default_factory=list)
    quant: str | None = None
    bytes_code: int | None = None
    bytes_total: int | None = None
    over_cap: bool = False
    # eval_time total (roundtrip + n-gram/TTT pass), else the roundtrip's eval_time.
    eval_time_ms: float | None = None
    # (positions, max_abs_sum_err, max_gold_err)
    audit: tuple[int, float, float] | None = None
    audit_failed: bool = False
    # The score's exact line: final_ngram_ttt_exact when that pass ran, else final_<quant>_roundtrip_exact.
    final_line: str | None = None
    val_loss: float | None = None
    val_bpb: float | None = None

    @property
    def seed(self) -> int | None:
        return int(self.hparams["seed"]) if self.hparams.get("seed", "").isdigit() else None

    @property
    def mixer_ran(self) -> bool:
        # Mirrors train_gpt.ngram_orders(): orders 2..NGRAM_MAX_ORDER when NGRAM=1.
        return self.hparams.get("ngram") == "True" and int(self.hparams.get("ngram_max_order", 2)) >= 2

    @property
    def expects_ngram_ttt(self) -> bool:
        return self.hparams.get("ngram") == "True" or self.hparams.get("ttt") == "True"


def parse_text(text: str, path: Path) -> RunLog:
    """Parse the lines of a train_gpt.py log (file or rank-0 stdout); later lines win."""
    run = RunLog(Path(path))
    exact: dict[str, tuple[float, float]] = {}
    # step_avg is the last train line's; a val line's only stands in when train lines are off (TRAIN_LOG_EVERY=0).
    last_train = None
    for line in text.splitlines():
        if m := RE_HPARAM.match(line):
            run.hparams[m[1]] = m[2]
        elif m := RE_TRAIN.match(line):
            run.steps, run.train_time_ms, run.step_avg_ms = int(m[1]), float(m[2]), float(m[3])
            last_train = run.step_avg_ms
        elif m := RE_VAL.match(line):
            run.steps, run.train_time_ms = int(m[1]), float(m[3])
            run.step_avg_ms = last_train if last_train is not None else float(m[4])
            run.val_curve.append((float(m[3]), float(m[2])))
        elif m := RE_EXACT.match(line):
            exact[m[1]] = (float(m[2]), float(m[3]))
        elif m := RE_ROUNDTRIP.match(line):
            run.eval_time_ms = float(m[1])
        elif m := RE_EVAL_TOTAL.match(line):
            run.eval_time_ms = float(m[1])
        elif m := RE_TOTAL_BYTES.match(line):
            run.quant, run.bytes_total = m[1], int(m[2])
        elif m := RE_CODE_BYTES.match(line):
            run.bytes_code = int(m[1])
        elif m := RE_AUDIT.match(line):
            run.audit = (int(m[1]), float(m[2]), float(m[3]))
        elif m := RE_CODE_SHA.match(line):
            run.code_sha256 = m[1]
        elif m := RE_RUN_ID.match(line):
            run.run_id = m[1]
        elif m := RE_WORLD.match(line):
            run.world_size = int(m[1])
        elif m := RE_HARDWARE.match(line):
            run.hardware = m[1]
        else:
            run.stopped_early |= bool(RE_STOPPED.match(line))
            run.over_cap |= bool(RE_OVER_CAP.match(line))
            run.audit_failed |= bool(RE_AUDIT_FAILED.match(line))
    # The score is the n-gram/TTT pass whenever it ran; falling back to the roundtrip line for a run that died in
    # that pass would report a score the submission does not have.
    if run.expects_ngram_ttt or "final_ngram_ttt_exact" in exact:
        run.final_line = "final_ngram_ttt_exact"
    elif run.quant is not None:
        run.final_line = f"final_{run.quant}_roundtrip_exact"
    run.val_loss, run.val_bpb = exact.get(run.final_line, (None, None))
    return run


def parse_log(path: str | Path) -> RunLog:
    return parse_text(Path(path).read_text(encoding="utf-8"), Path(path))



def log_fields(text: str, prefix: str) -> dict[str, float]:
    """The numeric `key:value` fields of the last log line starting with `prefix` (a trailing "ms" is dropped).
    KeyError naming the prefix if no line starts with it."""
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    if not lines:
        raise KeyError(f"no log line starts with {prefix!r}")
    fields = {}
    for item in lines[-1].split():
        key, sep, value = item.partition(":")
        if sep:
            try:
                fields[key] = float(value.removesuffix("ms"))
            except ValueError:
                pass
    return fields
