"""Trainer throughput with and without the n-gram mixer, side by side in one run (prints figures).

  python bench/trainer_bench.py              # CPU: configs/sample_cpu.env, 2 repeats of the settings alternated
  python bench/trainer_bench.py --gpu        # one GPU: baseline config (9x512, 524,288 tokens/step, seq 1024)

GPU mode also scores the whole sample val shard with the cache and TTT (the eval-time projection) and runs at
full LR (WARMDOWN_FRAC=0), so its first steps' train loss compares with a 20000-step baseline run. Both modes
train on the bundled sample (628K train tokens): past the first epoch the loss reflects memorization.
Settings: "ngram" (the mixer as configured, with the document cache), "stride_N" for each of --strides (the same
with NGRAM_TRAIN_STRIDE=N), "no_document" (NGRAM_DOC_ORDER=0) and "plain" (NGRAM=0); the overheads are each
against "plain". On GPU also "past_prefill" (NGRAM_PREFILL_TOKENS=0): every step counted as past the prefill,
the usual case of a competition run, which the 628K-token sample cannot otherwise reach with 524,288-token steps
(its tables are empty, so it lacks their lookups, a few kernels). Step times are steady-state (devkit's
RunLog.steady_step_ms: the second half of the train lines, so neither the n-gram prefill nor the first steps).
A run that fails is reported and the others still run; the bench then exits nonzero.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit import SAMPLE_SHARDS, SAMPLE_TOKENIZER, parse_text, read_env_file  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: 200 on GPU, 30 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per setting (default: 1 on GPU, 2 on CPU)")
    parser.add_argument("--strides", default="1", help="NGRAM_TRAIN_STRIDE settings beside the default's (16)")
    args = parser.parse_args()
    strides = [n for n in args.strides.split(",") if n]
    sample = dict(DATA_PATH=str(SAMPLE_SHARDS), TOKENIZER_PATH=str(SAMPLE_TOKENIZER))
    if args.gpu:
        steps, repeats = args.steps or 200, args.repeats or 1
        # The baseline model (configs/baseline_2024.env) on the sp1024 sample, at full LR.
        base = dict(read_env_file(REPO / "configs" / "baseline_2024.env"), **sample, WARMDOWN_FRAC="0",
                    WARMUP_STEPS="10", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="20", MAX_WALLCLOCK_SECONDS="0")
        short = dict(TTT="0", ITERATIONS=str(steps // 2), VAL_MAX_TOKENS="131072")
        settings = {"ngram": dict(NGRAM="1", TTT="1", ITERATIONS=str(steps)),
                    **{f"stride_{n}": dict(short, NGRAM="1", NGRAM_TRAIN_STRIDE=n) for n in strides},
                    "no_document": dict(short, NGRAM="1", NGRAM_DOC_ORDER="0"),
                    "past_prefill": dict(short, NGRAM="1", NGRAM_PREFILL_TOKENS="0"), "plain": dict(short, NGRAM="0")}
    else:
        steps, repeats = args.steps or 30, args.repeats or 2
        base = dict(read_env_file(REPO / "configs" / "sample_cpu.env"), ITERATIONS=str(steps),
                    VAL_LOSS_EVERY="0", VAL_MAX_TOKENS="16384", TTT="0")
        settings = {"ngram": dict(NGRAM="1"), **{f"stride_{n}": dict(NGRAM="1", NGRAM_TRAIN_STRIDE=n) for n in strides},
                    "no_document": dict(NGRAM="1", NGRAM_DOC_ORDER="0"), "plain": dict(NGRAM="0")}
    workdir = Path(tempfile.mkdtemp(prefix="trainer_bench_"))
    step_ms = {name: [] for name in settings}
    failed = []
    for repeat in range(repeats):
        for name, overrides in settings.items():
            run_id = f"{name}{repeat}"
            env = dict(os.environ, **base, **overrides, RUN_ID=run_id, PYTHONUNBUFFERED="1")
            # a failed run (a crash, a failed audit) is reported, and the other settings still run
            code = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=workdir, env=env,
                                  stdout=subprocess.DEVNULL).returncode
            log_path = workdir / "logs" / f"{run_id}.txt"
            log = log_path.read_text() if log_path.exists() else ""  # a run can fail before it writes its log
            steady = parse_text(log, log_path).steady_step_ms
            if steady is not None:
                step_ms[name].append(steady)
            keep = ("step:", "ngram_prefill", "peak", "Total", "final_", "legality", "LEGALITY", "eval_time",
                    "scored")
            lines = [ln for ln in log.splitlines() if ln.startswith(keep)]
            print(f"== {run_id} (exit {code})\n" + "\n".join(lines), flush=True)
            if code:
                failed.append(f"{run_id} exited {code}")
    tokens_per_step = int(base.get("TRAIN_BATCH_TOKENS", 524_288))
    # steady state: the second half of each run's train lines (no n-gram prefill, no first steps)
    print(f"\n{'setting':>12} {'ms/step (median)':>18} {'tokens/s':>12}   runs")
    for name, values in step_ms.items():
        ms = statistics.median(values) if values else float("nan")
        print(f"{name:>12} {ms:>18.2f} {tokens_per_step / ms * 1000:>12.0f}   {[round(v, 2) for v in values]}")
    for name in settings:
        if name != "plain" and step_ms[name] and step_ms["plain"]:
            ratio = statistics.median(step_ms[name]) / statistics.median(step_ms["plain"])
            print(f"step-time overhead of {name} over plain: {100 * (ratio - 1):+.1f}%")
    print(f"logs in {workdir}/logs")
    if failed:
        sys.exit("failed runs: " + "; ".join(failed))


if __name__ == "__main__":
    main()
