"""devkit.py: what the tools around a run share (tests, benches, records/, analysis/): where the bundled sample
data lives and how to read a train_gpt.py log. train_gpt.py never imports it: a run needs neither.

  from devkit import SAMPLE_SHARDS, SAMPLE_TOKENIZER, parse_log, log_fields

parse_log / parse_text give a RunLog: every field package.py, the benches and the tests read from a log, including
whether the n-gram mixer ran (RunLog.mixer_ran, from the logged ngram_orders; never re-derived from settings).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ngram_mixer import AUDIT_MAX_GOLD_ERR, AUDIT_MAX_RESCORE_DELTA, AUDIT_MAX_SUM_ERR

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
# An audit error can be nan or inf (printed by %.3e as such): it must still parse, to be refused as a failure.
AUDIT_NUM = rf"{NUM}|nan|inf"
RE_AUDIT = re.compile(rf"^legality_audit positions:(\d+) max_abs_sum_err:({AUDIT_NUM}) "
                      rf"max_gold_logp_err:({AUDIT_NUM}) max_rescore_logp_delta:({AUDIT_NUM}) seed:(\d+)$")
# Audit lines of earlier formats, whose audit never replaced the target itself: recognized to refuse by name.
RE_AUDIT_OLD = re.compile(r"^legality_audit positions:\d+ max_abs_sum_err:\S+ "
                          r"(max_gold_err:\S+|max_gold_logp_err:\S+ max_future_logp_delta:\S+)$")
RE_TOKENIZER = re.compile(r"^tokenizer path:(.+) vocab_size:(\d+) sha256:([0-9a-f]{64})$")
RE_VAL_TOKENS = re.compile(r"^val_tokens:(\d+) scored_targets:\d+$")
RE_SCORED = re.compile(r"^scored_tokens:(\d+) scored_bytes:(\d+)$")
RE_MODEL_PARAMS = re.compile(r"^model_params:\d+ ngram_orders:\[([\d, ]*)\]$")
RE_AUDIT_FAILED = re.compile(r"^LEGALITY_AUDIT_FAILED")
RE_EVAL_TOTAL = re.compile(rf"^eval_time (?:\w+:{NUM}ms )*total:({NUM})ms$")
RE_EVAL_WALLCLOCK = re.compile(rf"^eval_wallclock:({NUM})ms$")
RE_EXACT = re.compile(rf"^(final_ngram_ttt_exact|final_\w+_roundtrip_exact) val_loss:({NUM}) val_bpb:({NUM})$")


# The trainer's pass/fail limits (it logs LEGALITY_AUDIT_FAILED and exits beyond them), from their one home.
AUDIT_TOLERANCES = dict(max_abs_sum_err=AUDIT_MAX_SUM_ERR, max_gold_logp_err=AUDIT_MAX_GOLD_ERR,
                        max_rescore_logp_delta=AUDIT_MAX_RESCORE_DELTA)


@dataclass(frozen=True)
class Audit:
    """The legality_audit line: at `positions` sampled targets the run re-scored the target with it and every
    later token replaced; each error is the worst over those targets (ngram_mixer.LegalityAudit)."""
    positions: int
    # |sum over the vocabulary - 1|
    max_abs_sum_err: float
    # |log p(gold) enumerated - log p(gold) scored|
    max_gold_logp_err: float
    # largest change of the distribution or a score when the target and every later token are replaced
    max_rescore_logp_delta: float
    # the seed that drew the positions (AUDIT_SEED reproduces the audit)
    seed: int = 0

    def failures(self) -> list[str]:
        """Each way this audit misses the thresholds, as text; empty when it passes. A nan error fails."""
        found = [] if self.positions > 0 else [f"positions:{self.positions} (no target audited)"]
        return found + [f"{name}:{getattr(self, name):.3e} > {tolerance:g}"
                        for name, tolerance in AUDIT_TOLERANCES.items() if not getattr(self, name) <= tolerance]


@dataclass(frozen=True)
class Tokenizer:
    """The tokenizer line: the sentencepiece model a run loaded, with the sha256 of its file."""
    path: str
    vocab_size: int
    sha256: str


@dataclass
class RunLog:
    """What one train_gpt.py log says; a field is None (or empty) where the log lacks its line."""
    path: Path
    run_id: str | None = None
    hparams: dict[str, str] = field(default_factory=dict)
    hardware: str | None = None
    world_size: int | None = None
    code_sha256: str | None = None
    tokenizer: Tokenizer | None = None
    # The n-gram orders the model mixes (model_params line); () when the mixer is off, None when not logged.
    ngram_orders: tuple[int, ...] | None = None
    # Tokens of the val stream the run loaded (val_tokens line) and the targets and bytes its final pass scored
    # (scored_tokens line, logged by the n-gram/TTT pass).
    val_tokens: int | None = None
    scored_tokens: int | None = None
    scored_bytes: int | None = None
    steps: int | None = None
    step_avg_ms: float | None = None
    # train_time of the last step line; it includes the n-gram prefill.
    train_time_ms: float | None = None
    # (step, train_time_ms) of every train line.
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False
    # (train_time_ms, val_bpb) of every step:N val line.
    val_curve: list[tuple[float, float]] = field(default_factory=list)
    quant: str | None = None
    bytes_code: int | None = None
    bytes_total: int | None = None
    over_cap: bool = False
    # eval_wallclock (reading the artifact to the last score line, what the 600 s limit counts); in logs
    # without it, eval_time total (roundtrip + n-gram/TTT pass), else the roundtrip's eval_time.
    eval_time_ms: float | None = None
    audit: Audit | None = None
    # A legality_audit line of an earlier format, whose audit never replaced the target itself.
    audit_old_format: bool = False
    audit_failed: bool = False
    # The score's exact line: final_ngram_ttt_exact when that pass ran, else final_<quant>_roundtrip_exact.
    final_line: str | None = None
    val_loss: float | None = None
    val_bpb: float | None = None

    @property
    def seed(self) -> int | None:
        return int(self.hparams["seed"]) if self.hparams.get("seed", "").isdigit() else None

    @property
    def steady_step_ms(self) -> float | None:
        """ms per step over the second half of the train lines: unlike step_avg, without the n-gram prefill and the
        first steps' warm-up, which weigh heavily in a short run. None with fewer than two train lines."""
        if len(self.train_curve) < 2:
            return None
        (s0, t0), (s1, t1) = self.train_curve[(len(self.train_curve) - 1) // 2], self.train_curve[-1]
        return (t1 - t0) / (s1 - s0)

    @property
    def mixer_ran(self) -> bool:
        """Whether the n-gram mixer was on, as the trainer logged it (model_params ... ngram_orders:[...])."""
        return bool(self.ngram_orders)

    @property
    def expects_ngram_ttt(self) -> bool:
        return self.mixer_ran or self.hparams.get("ttt") == "True"


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
            run.train_curve.append((run.steps, run.train_time_ms))
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
        elif m := RE_EVAL_WALLCLOCK.match(line):
            run.eval_time_ms = float(m[1])
        elif m := RE_TOTAL_BYTES.match(line):
            run.quant, run.bytes_total = m[1], int(m[2])
        elif m := RE_CODE_BYTES.match(line):
            run.bytes_code = int(m[1])
        elif m := RE_AUDIT.match(line):
            run.audit = Audit(int(m[1]), float(m[2]), float(m[3]), float(m[4]), int(m[5]))
        elif m := RE_TOKENIZER.match(line):
            run.tokenizer = Tokenizer(m[1], int(m[2]), m[3])
        elif m := RE_VAL_TOKENS.match(line):
            run.val_tokens = int(m[1])
        elif m := RE_SCORED.match(line):
            run.scored_tokens, run.scored_bytes = int(m[1]), int(m[2])
        elif m := RE_MODEL_PARAMS.match(line):
            run.ngram_orders = tuple(int(order) for order in m[1].split(",") if order.strip())
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
            run.audit_old_format |= bool(RE_AUDIT_OLD.match(line))
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
