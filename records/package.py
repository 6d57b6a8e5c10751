r"""
records/package.py: check the seed logs of train_gpt.py and package them as a challenge record folder.

  python records/package.py logs/nm_seed1337.txt logs/nm_seed42.txt logs/nm_seed2025.txt \
      --name NgramMixer --author "Jane Doe" --github-id janedoe --blurb "Exact n-gram mixer + TTT" \
      --sota-val-bpb 1.0611
  python records/package.py logs/cpu_seed*.txt --name CpuDemo --author me --non-record --out-root /tmp/records

run.sh calls it after its seeds. It writes records/track_10min_16mb/<YYYY-MM-DD>_<Name>/ (track_non_record_16mb/
with --non-record): README.md, submission.json, train_seed<SEED>.log per seed, copies of train_gpt.py,
ngram_mixer.py and requirements.txt from the repo root, and loss.png. It refuses (exit 1, each reason naming its
log) when, on either track: a log lacks its final exact line, its tokenizer line or its model_params line, an
artifact exceeds 16,000,000 bytes, the seeds ran different code, tokenizers, val sets or settings, a seed repeats,
the legality audit is missing, failed or predates the re-score audit, the repo's code is
not the code the logs ran, or the destination exists; and, on the record track (no --non-record), when training
or evaluation took over 600 s, a log is not world_size:8 on H100s, not VAL_MAX_TOKENS=0 or did not score every
val target, there are fewer than 3 seeds, --sota-val-bpb is missing, or the mean val_bpb is not below it by the
0.005-nat margin (converted to BPB with the run's tokens per byte) at p < 0.01 (one-sided t-test over seeds).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first: no display on servers)
import scipy.stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devkit import RunLog, parse_log, parse_text  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parents[1]
CODE_FILES = ("train_gpt.py", "ngram_mixer.py")
COPIED_FILES = CODE_FILES + ("requirements.txt",)
RECORD_TRACK, NON_RECORD_TRACK = "track_10min_16mb", "track_non_record_16mb"
ARTIFACT_CAP_BYTES = 16_000_000
TIME_CAP_MS = 600_000.0
# The record track's setting: 8 processes on H100s, the whole val set, and enough seeds for a t-test.
RECORD_WORLD_SIZE = 8
RECORD_GPU = "H100"
RECORD_MIN_SEEDS = 3
# Challenge rule: a new record beats the best by >= 0.005 nats with p < 0.01 over seeds. The margin is converted
# to BPB with the run's own tokens per byte, so that runs with different tokenizers compare.
RECORD_MARGIN_NATS = 0.005
RECORD_P_VALUE = 0.01
# Settings that differ between the seeds of one study without changing the run: the seed, and the names of its log
# and of its per-target score dump (EVAL_DUMP).
PER_SEED_HPARAMS = ("seed", "run_id", "eval_dump")

# -----------------------------
# CHECKS
# -----------------------------

def check_runs(runs: list[RunLog], non_record: bool) -> list[str]:
    """Every reason these logs cannot form a record folder on either track, each naming its log (the time limits
    only on the record track); empty when they can."""
    problems = []
    for run in runs:
        def bad(reason: str) -> None:
            problems.append(f"{run.path}: {reason}")

        if run.seed is None:
            bad("no 'hparam seed:' line (not a train_gpt.py log?)")
        if run.code_sha256 is None:
            bad("no code_sha256 line")
        if run.tokenizer is None:
            bad("no 'tokenizer path:.. vocab_size:.. sha256:..' line: the record must name its tokenizer")
        if run.val_loss is None:
            bad(f"no final exact line ({run.final_line or 'final_..._exact'} val_loss:.. val_bpb:..): "
                "the run did not finish")
        if run.over_cap:
            bad(f"ARTIFACT_OVER_CAP: the artifact exceeds {ARTIFACT_CAP_BYTES:,} bytes")
        if run.bytes_total is None:
            bad("no 'Total submission size' line")
        elif run.bytes_total > ARTIFACT_CAP_BYTES:
            bad(f"artifact total {run.bytes_total:,} bytes exceeds the cap of {ARTIFACT_CAP_BYTES:,}")
        if run.train_time_ms is None:
            bad("no step lines, so no training time (an EVAL_ARTIFACT-only run?)")
        elif not non_record:
            # The trainer checks the wallclock cap after each step, so a capped run overshoots by at most the
            # step that crossed it (as in the challenge's own baseline logs); step_avg stands in for that step.
            allowed = TIME_CAP_MS + (run.step_avg_ms or 0.0) * run.stopped_early
            if run.train_time_ms > allowed:
                bad(f"training took {run.train_time_ms / 1000:.3f} s > 600 s (use --non-record)")
        if run.eval_time_ms is None:
            if run.val_loss is not None:
                bad("no evaluation time line")
        elif not non_record and run.eval_time_ms > TIME_CAP_MS:
            bad(f"evaluation took {run.eval_time_ms / 1000:.3f} s > 600 s (use --non-record)")
        if run.ngram_orders is None:
            bad("no 'model_params:.. ngram_orders:[..]' line: cannot tell whether the n-gram mixer ran")
        problems += [f"{run.path}: {reason}" for reason in audit_problems(run)]

    def differ(what: str, value) -> None:
        if len({value(run) for run in runs}) > 1:
            problems.extend(f"{run.path}: seeds {what}: {value(run)}" for run in runs)

    differ("ran different code", lambda run: f"code_sha256:{run.code_sha256}")
    differ("used different tokenizers", lambda run: f"sha256:{run.tokenizer.sha256 if run.tokenizer else None}")
    differ("scored different val sets", lambda run: f"scored_tokens:{run.scored_tokens} "
                                                   f"scored_bytes:{run.scored_bytes}")
    # A seed study varies the seed only; the rest of PER_SEED_HPARAMS name each seed's files.
    settings = [{k: v for k, v in run.hparams.items() if k not in PER_SEED_HPARAMS} for run in runs]
    for run, other in zip(runs[1:], settings[1:]):
        diff = sorted(k for k in settings[0].keys() | other.keys() if settings[0].get(k) != other.get(k))
        if diff:
            problems.append(f"{run.path}: settings differ from {runs[0].path} in {', '.join(diff)}")
    seeds = [run.seed for run in runs if run.seed is not None]
    for seed in sorted({s for s in seeds if seeds.count(s) > 1}):
        problems.append(f"seed {seed} appears twice: " + ", ".join(str(r.path) for r in runs if r.seed == seed))
    return problems


def audit_problems(run: RunLog) -> list[str]:
    """Why this log's legality audit does not prove its scores valid; empty when it does. Every final pass is
    audited, with or without the mixer."""
    if run.audit_failed:
        return ["LEGALITY_AUDIT_FAILED: a scored distribution does not sum to 1, does not match its score, or "
                "depends on its target or later tokens, or a learner saw a target before it was scored"]
    if run.audit is None:
        if run.audit_old_format:
            return ["audit line predates the re-score audit (no max_rescore_logp_delta: the target itself was never "
                    "replaced): rerun with the current train_gpt.py"]
        return ["there is no legality_audit line"]
    failures = run.audit.failures()
    return [f"legality audit failed: {', '.join(failures)}"] if failures else []


def causality_proof_problems(path: Path, runs: list[RunLog]) -> list[str]:
    """Why records/prove_causality.py's JSON at `path` does not back these runs; empty when it does."""
    try:
        proof = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        return [f"{path}: not a readable causality proof ({error})"]
    problems = [] if proof.get("passed") is True else [
        f"{path}: the causality proof failed (first difference: {proof.get('first_difference')})"]
    if proof.get("code_sha256") != runs[0].code_sha256:
        problems.append(f"{path}: proved code_sha256 {proof.get('code_sha256')}, the logs ran {runs[0].code_sha256}")
    return problems


def record_track_problems(runs: list[RunLog], sota_val_bpb: float | None) -> list[str]:
    """Why these logs are not a record-track submission (8xH100, the whole val set, >= 3 seeds, a significant
    gain over --sota-val-bpb), each naming its log; empty when they are."""
    problems = []
    for run in runs:
        def bad(reason: str) -> None:
            problems.append(f"{run.path}: {reason} (use --non-record)")

        if run.world_size != RECORD_WORLD_SIZE:
            bad(f"world_size:{run.world_size}: the record track runs {RECORD_WORLD_SIZE} processes on 8x{RECORD_GPU}")
        if run.hardware is None:
            bad("no hardware line ('Running Python .., PyTorch .., <GPU>', written to the log file only)")
        elif RECORD_GPU not in run.hardware:
            bad(f"hardware '{run.hardware}' is not an {RECORD_GPU}")
        if run.hparams.get("val_max_tokens") != "0":
            bad(f"hparam val_max_tokens:{run.hparams.get('val_max_tokens')}: the record track scores the whole val "
                "set (VAL_MAX_TOKENS=0)")
        if run.val_tokens is None or run.scored_tokens is None:
            bad("no val_tokens or scored_tokens line: cannot show the whole val set was scored")
        elif run.scored_tokens != run.val_tokens - 1:
            bad(f"scored_tokens:{run.scored_tokens} is not every target of the val set "
                f"(val_tokens:{run.val_tokens} - 1 = {run.val_tokens - 1})")
    seeds = sorted({run.seed for run in runs if run.seed is not None})
    if len(seeds) < RECORD_MIN_SEEDS:
        problems.append(f"{', '.join(str(run.path) for run in runs)}: {len(seeds)} distinct seed(s) {seeds}; the "
                        f"record track needs at least {RECORD_MIN_SEEDS} (use --non-record)")
    if sota_val_bpb is None:
        problems.append("--sota-val-bpb missing: the record track tests significance against the current record's "
                        "val_bpb (use --non-record otherwise)")
    else:
        result = significance(runs, sota_val_bpb)
        if result is not None and not result.record:
            problems.append(f"{', '.join(str(run.path) for run in runs)}: "
                            + significance_statement(runs, sota_val_bpb) + " (use --non-record)")
    return problems


def repo_code_sha256() -> str:
    """The trainer's code_sha256 of the code that would be copied: sha256 of train_gpt.py + ngram_mixer.py bytes."""
    return hashlib.sha256(b"".join((REPO_ROOT / name).read_bytes() for name in CODE_FILES)).hexdigest()


# -----------------------------
# STATISTICS
# -----------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1, as in the t-test); no deviation from one value."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def margin_bpb(scored_tokens: int, scored_bytes: int) -> float:
    """RECORD_MARGIN_NATS per token in bits per byte of this val set: nats/token x tokens / (bytes x ln 2)."""
    return RECORD_MARGIN_NATS * scored_tokens / (scored_bytes * math.log(2))


@dataclass(frozen=True)
class Significance:
    """One-sided one-sample t-test of H0: mean val_bpb over seeds >= sota_val_bpb - margin_bpb."""
    sota_val_bpb: float
    margin_bpb: float
    mean_val_bpb: float
    # Positive when the seeds' mean is below the threshold: (sota - margin - mean) / (std / sqrt(n)).
    t: float
    p: float
    degrees_of_freedom: int

    @property
    def record(self) -> bool:
        return self.p < RECORD_P_VALUE


def significance(runs: list[RunLog], sota_val_bpb: float) -> Significance | None:
    """The t-test of the seeds' val_bpb against the record, with the margin in this val set's BPB; None when it
    cannot be run: fewer than 2 scores, or no scored_tokens line to convert the margin with."""
    bpbs = [run.val_bpb for run in runs if run.val_bpb is not None]
    first = runs[0]
    if len(bpbs) < 2 or first.scored_tokens is None:
        return None
    margin = margin_bpb(first.scored_tokens, first.scored_bytes)
    result = scipy.stats.ttest_1samp(bpbs, sota_val_bpb - margin, alternative="less")
    return Significance(sota_val_bpb, margin, statistics.mean(bpbs), -float(result.statistic), float(result.pvalue),
                        len(bpbs) - 1)


def significance_statement(runs: list[RunLog], sota_val_bpb: float | None) -> str:
    if sota_val_bpb is None:
        return "No comparison made: no --sota-val-bpb was given."
    result = significance(runs, sota_val_bpb)
    if result is None:
        why = "a t-test needs at least 2 seeds" if len(runs) < 2 else \
            "the logs have no scored_tokens line to convert the 0.005-nat margin to BPB"
        return f"Not tested against SOTA val_bpb {sota_val_bpb}: {why}."
    verdict = "record" if result.record else "not significant"
    return (f"{verdict} (p = {result.p:.3g}): one-sided t-test that the mean val_bpb {result.mean_val_bpb:.5f} is "
            f"below the SOTA {sota_val_bpb} by at least {RECORD_MARGIN_NATS} nats per token = "
            f"{result.margin_bpb:.5f} BPB on this val set (t = {result.t:.3f}, {result.degrees_of_freedom} degrees "
            f"of freedom; a record needs p < {RECORD_P_VALUE}).")


# -----------------------------
# RECORD FOLDER
# -----------------------------

def fmt_stat(values: list[float], spec: str) -> str:
    mean, std = mean_std(values)
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


def command_text(run: RunLog, seeds: list[int]) -> str:
    """The logged settings as the environment of one torchrun line per seed, to run from inside the folder."""
    def env_value(value: str) -> str:
        # Booleans are logged as True/False but read back as bool(int(..)).
        return {"True": "1", "False": "0"}.get(value, value)

    env = [f"{name.upper()}={shlex.quote(env_value(value))}" for name, value in sorted(run.hparams.items())
           if name not in PER_SEED_HPARAMS and value != ""]
    return (f"for SEED in {' '.join(map(str, seeds))}; do\n  "
            + " \\\n  ".join(env + [f"SEED=$SEED RUN_ID=seed$SEED torchrun --standalone "
                                    f"--nproc_per_node={run.world_size or 1} train_gpt.py"]) + "\ndone")


def proof_sentence(path: Path) -> str:
    proof = json.loads(Path(path).read_text())
    return (f"Causality proof (`records/prove_causality.py`, `causality_proof.json`): with every val token after "
            f"{proof['after']:,} replaced by a random id, all {proof['targets_compared']:,} losses up to it stayed "
            f"bit-identical ({proof['world_size']} process(es), artifact sha256 `{proof['artifact_sha256']}`).")


def readme_text(runs: list[RunLog], args: argparse.Namespace, track: str) -> str:
    first, losses, bpbs = runs[0], [r.val_loss for r in runs], [r.val_bpb for r in runs]
    rows = [f"| {r.seed} | {r.val_loss:.8f} | {r.val_bpb:.8f} | {r.steps} | {r.step_avg_ms:.2f} ms | "
            f"{r.train_time_ms / 1000:.1f} s | {r.eval_time_ms / 1000:.1f} s | {r.bytes_total:,} |" for r in runs]
    means = [fmt_stat(losses, ".5f"), fmt_stat(bpbs, ".5f"), fmt_stat([r.steps for r in runs], ".0f"),
             fmt_stat([r.step_avg_ms for r in runs], ".2f") + " ms",
             fmt_stat([r.train_time_ms / 1000 for r in runs], ".1f") + " s",
             fmt_stat([r.eval_time_ms / 1000 for r in runs], ".1f") + " s", f"max {max(r.bytes_total for r in runs):,}"]
    rows.append("| mean ± std | " + " | ".join(means) + " |")
    audits = [f"- seed {r.seed}: `legality_audit positions:{r.audit.positions} max_abs_sum_err:"
              f"{r.audit.max_abs_sum_err:.3e} max_gold_logp_err:{r.audit.max_gold_logp_err:.3e} "
              f"max_rescore_logp_delta:{r.audit.max_rescore_logp_delta:.3e} seed:{r.audit.seed}`" for r in runs]
    byline = f"Author: {args.author}" + (f" (@{args.github_id})" if args.github_id else "")
    what = (f"{len(runs)} seed(s) of `train_gpt.py` on {first.world_size} process(es) "
            f"({first.hardware or 'hardware not logged'}); n-gram mixer {'on' if first.mixer_ran else 'off'}, "
            f"TTT {'on' if first.hparams.get('ttt') == 'True' else 'off'}, {first.quant} artifact. "
            f"The score is the `{first.final_line}` line of each log.")
    lines = [
        f"# {args.name}", "",
        *([args.blurb, ""] if args.blurb else []),
        f"{byline} · Date: {args.date} · Track: `{track}`", "",
        what, "",
        "## Result", "",
        f"val_bpb **{fmt_stat(bpbs, '.5f')}**, val_loss {fmt_stat(losses, '.5f')} nats "
        f"(mean ± sample std over {len(runs)} seeds).", "",
        significance_statement(runs, args.sota_val_bpb), "",
        scored_text(first), "",
        f"Tokenizer: `{first.tokenizer.path}` (vocab {first.tokenizer.vocab_size}, "
        f"sha256 `{first.tokenizer.sha256}`), the same for every seed.", "",
        "| seed | val_loss | val_bpb | steps | step_avg | train time | eval time | artifact bytes |",
        "|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Train time includes the n-gram prefill; eval time is the wall clock from reading the artifact to the last score line. "
        f"Code: {first.bytes_code:,} bytes (train_gpt.py + ngram_mixer.py), code_sha256 `{first.code_sha256}`.", "",
        *(["Legality audit (at sampled targets, re-scored with the target and every later token replaced, the "
           "distribution sums to 1, gives the logged score and does not move):", *audits, ""] * bool(audits)),
        *([proof_sentence(args.causality_proof), ""] if args.causality_proof else []),
        "![val_bpb against training time](loss.png)", "",
        "## Command", "",
        "Every hyperparameter as logged; run from inside this folder:", "",
        "```bash", command_text(first, [r.seed for r in runs]), "```", "",
        "## Files", "",
        "- `train_seed<SEED>.log`: the trainer's logs (each starts with the source that ran)",
        "- `train_gpt.py`, `ngram_mixer.py`, `requirements.txt`: the code and its dependencies",
        "- `submission.json`: metadata; val_loss and val_bpb are seed means, bytes_total the largest over seeds",
        "- `loss.png`: val_bpb against training time per seed; the star is the final score", "",
    ]
    return "\n".join(lines)


def scored_text(run: RunLog) -> str:
    if run.scored_tokens is None or run.val_tokens is None:
        return "Scored targets: not logged (no val_tokens or scored_tokens line)."
    every = "every target once" if run.scored_tokens == run.val_tokens - 1 else "NOT every target"
    # The reference eval_val cuts the val stream into whole TRAIN_SEQ_LEN-token sequences and drops the rest.
    seq_len = int(run.hparams.get("train_seq_len", 1024))
    whole_sequences = (run.val_tokens - 1) // seq_len * seq_len
    return (f"Scored: {run.scored_tokens:,} targets ({run.scored_bytes:,} bytes) of a {run.val_tokens:,}-token val "
            f"stream, {every}, with sliding windows; the challenge's reference `eval_val` scores whole "
            f"{seq_len}-token sequences only ({whole_sequences:,} targets).")


def submission(runs: list[RunLog], args: argparse.Namespace, track: str) -> dict:
    # The score is the seed mean; the largest artifact is the one that has to fit under the cap.
    first = runs[0]
    result = significance(runs, args.sota_val_bpb) if args.sota_val_bpb is not None else None
    return dict(
        author=args.author, github_id=args.github_id, name=args.name, blurb=args.blurb, date=args.date, track=track,
        val_loss=round(statistics.mean(r.val_loss for r in runs), 8),
        val_bpb=round(statistics.mean(r.val_bpb for r in runs), 8),
        bytes_total=max(r.bytes_total for r in runs), bytes_code=max(r.bytes_code for r in runs),
        seeds=[r.seed for r in runs],
        world_size=first.world_size, hardware=first.hardware, tokenizer=asdict(first.tokenizer),
        scored_tokens=first.scored_tokens, scored_bytes=first.scored_bytes,
        significance=dict(asdict(result), margin_nats=RECORD_MARGIN_NATS, p_threshold=RECORD_P_VALUE,
                          record=result.record) if result else None,
    )


def plot_loss(runs: list[RunLog], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        (line,) = ax.plot([t / 1000 for t, _ in run.val_curve], [b for _, b in run.val_curve], marker=".",
                          label=f"seed {run.seed}")
        ax.plot([run.train_time_ms / 1000], [run.val_bpb], marker="*", markersize=12, linestyle="none",
                color=line.get_color())
    ax.set(xlabel="training time (s)", ylabel="val_bpb", title=f"{title}  (star: {runs[0].final_line})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_record(runs: list[RunLog], args: argparse.Namespace, dest: Path, track: str) -> None:
    # Build beside the destination and rename at the end, so a failure never leaves a half-written record.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        # Logs are copied byte for byte: they are the evidence the README and submission.json are read from.
        for run in runs:
            shutil.copyfile(run.path, tmp / f"train_seed{run.seed}.log")
        for name in COPIED_FILES:
            shutil.copyfile(REPO_ROOT / name, tmp / name)
        if args.causality_proof:
            shutil.copyfile(args.causality_proof, tmp / "causality_proof.json")
        (tmp / "submission.json").write_text(json.dumps(submission(runs, args, track), indent=2) + "\n")
        (tmp / "README.md").write_text(readme_text(runs, args, track))
        plot_loss(runs, tmp / "loss.png", args.name)
        # mkdtemp makes the folder private; a record is an ordinary folder.
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp)
        raise


def folder_name(date: str, name: str) -> str:
    # The name becomes one path component: spaces, slashes and the like turn into "_".
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("._")
    if not slug:
        raise SystemExit(f"--name {name!r} leaves no letters or digits for the folder name")
    return f"{date}_{slug}"


def iso_date(text: str) -> str:
    return datetime.date.fromisoformat(text).isoformat()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path, help="logs/<RUN_ID>.txt of each seed")
    parser.add_argument("--name", required=True, help="record name; the folder is <date>_<name>")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", default="")
    parser.add_argument("--blurb", default="", help="one paragraph: what the run changes")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), type=iso_date,
                        help="YYYY-MM-DD (default today)")
    parser.add_argument("--sota-val-bpb", type=float, default=None,
                        help="val_bpb of the current record, for the significance test (required for the record "
                             "track)")
    # Rejected by name: nats per token depend on the tokenizer, so a val_loss comparison across records misleads.
    parser.add_argument("--sota-val-loss", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--non-record", action="store_true",
                        help="file under track_non_record_16mb: skip the 600 s limits, 8xH100, full-val, seed-count "
                             "and significance requirements")
    parser.add_argument("--causality-proof", type=Path, default=None,
                        help="records/prove_causality.py's causality_proof.json for one of these runs' artifacts")
    parser.add_argument("--out-root", type=Path, default=REPO_ROOT / "records",
                        help="folder holding the track folders (default: this repo's records/)")
    args = parser.parse_args(argv)
    if args.sota_val_loss is not None:
        parser.error("--sota-val-loss was removed: val_loss is nats per token, which depends on the tokenizer, so it "
                     "does not compare across records; give the current record's val_bpb with --sota-val-bpb")

    runs = [parse_log(path) for path in args.logs]
    problems = check_runs(runs, args.non_record)
    if not args.non_record:
        problems += record_track_problems(runs, args.sota_val_bpb)
    # The record copies the repo's code, so it must be the code that ran (one hash; else check_runs says so).
    shas, repo_sha = {run.code_sha256 for run in runs}, repo_code_sha256()
    if len(shas) == 1 and None not in shas and repo_sha != runs[0].code_sha256:
        problems.append(f"{REPO_ROOT}: train_gpt.py + ngram_mixer.py hash to {repo_sha}, not the "
                        f"code_sha256 {runs[0].code_sha256} the logs ran: package from the code that ran")
    if args.causality_proof:
        problems += causality_proof_problems(args.causality_proof, runs)
    track = NON_RECORD_TRACK if args.non_record else RECORD_TRACK
    dest = args.out_root / track / folder_name(args.date, args.name)
    if dest.exists():
        problems.append(f"{dest} already exists: choose another --name or --date (records are never overwritten)")
    if problems:
        raise SystemExit("package.py: refusing to write a record folder:\n  " + "\n  ".join(problems))
    write_record(runs, args, dest, track)
    print(f"wrote {dest}")
    print(significance_statement(runs, args.sota_val_bpb))
    return dest


if __name__ == "__main__":
    main()
