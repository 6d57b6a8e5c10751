"""The table of bench/gpu_check.sh: one row per trainer stage from its log (devkit.parse_log), then the n-gram
bench's own output. Not run on its own: gpu_check.sh calls it with its output folder.

  python bench/gpu_check_table.py OUT_DIR gpu|cpu
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devkit import log_fields, parse_log  # noqa: E402

TRAINER_STAGES = ("reference", "baseline", "stack_plain", "stack_mixer")
EVAL_PHASES = ("roundtrip", "score", "audit", "cache", "gate", "ttt", "proof", "total")


def status(out: Path, stage: str) -> str:
    path = out / f"{stage}.status"
    return path.read_text().strip() if path.is_file() else "not run"


def trainer_row(out: Path, stage: str) -> str:
    log = out / "logs" / f"{stage}.txt"
    if not log.is_file():
        return f"| {stage} | {status(out, stage)} | | | | | |"
    run = parse_log(log)
    step_ms = f"{run.steady_step_ms:.1f}" if run.steady_step_ms else "-"
    bpb = f"{run.val_bpb:.4f}" if run.val_bpb is not None else "-"
    text = log.read_text()
    phases = log_fields(text, "eval_time ") if "\neval_time " in text else {}
    evals = " ".join(f"{k} {phases[k] / 1000:.1f}s" for k in EVAL_PHASES if k in phases) or (
        f"{run.eval_time_ms / 1000:.1f}s" if run.eval_time_ms else "-")
    size = f"{run.bytes_total:,}" if run.bytes_total else "-"
    fit = log_fields(text, "gate_fit ") if "\ngate_fit " in text else None
    fit = f"{fit['steps'] / fit['time'] * 1000:.1f}" if fit and fit["time"] else "-"
    return f"| {stage} | {status(out, stage)} | {step_ms} | {bpb} | {evals} | {size} | {fit} |"


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    stages = TRAINER_STAGES if mode == "gpu" else TRAINER_STAGES[1:]
    print(f"\ngpu_check ({mode}), logs in {out}\n")
    print("| stage | status | ms/step (steady) | val_bpb | eval time by phase | bytes (code + model) | "
          "gate-fit steps/s |")
    print("|---|---|---|---|---|---|---|")
    for stage in stages:
        print(trainer_row(out, stage))
    print(f"\nngram_bench ({status(out, 'ngram_bench')}):")
    bench = out / "ngram_bench.out"
    print(bench.read_text().rstrip() if bench.is_file() else "(no output)")
    failed = [s for s in ("shards", "shards_train", *stages, "ngram_bench") if status(out, s) != "ok"]
    if failed:
        print(f"\nfailed or not run: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
