"""When should the mixer train? The training modes side by side on the sample, paired on the same val targets.

  python bench/mixer_modes.py                       # equal steps: ITERATIONS of configs/sample_cpu.env (200)
  python bench/mixer_modes.py --wallclock 150       # equal wall-clock: every mode trains 150 s in all
  python bench/mixer_modes.py --seeds 1337,42 --gate-fit-seconds 15 --out /tmp/modes

Modes: "start0" (the lookups and the mixture loss from the first step: the design's joint training, the
reference), "start0.5" and "start0.9" (NGRAM_TRAIN_START), "gate_only" (no mixture in training, then
NGRAM_GATE_FIT_SECONDS of the gate alone on the frozen exported weights) and "plain" (NGRAM=0 in training: the
neural model's own figures; it is scored without the mixer). Every mode is scored by the same evaluation
(configs/sample_cpu.env's: the quick-start slice, cache + online gate; --ttt adds TTT) with EVAL_DUMP, and compared
with start0 of the same seed by records/compare.py's paired bootstrap over documents. Prints per run: steps,
training time, the neural and the system BPB, ΔBPB against start0 with its interval. On a shared machine the
training times, and so the equal-wall-clock steps, carry the machine's noise: the table shows them.
"""
import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit import SAMPLE_SHARDS, SAMPLE_TOKENIZER, log_fields, read_env_file  # noqa: E402
from records.compare import load_dump, paired_bootstrap  # noqa: E402


def modes(gate_fit_seconds: float) -> dict[str, dict]:
    return {"start0": dict(NGRAM_TRAIN_START="0"), "start0.5": dict(NGRAM_TRAIN_START="0.5"),
            "start0.9": dict(NGRAM_TRAIN_START="0.9"),
            "gate_only": dict(NGRAM_TRAIN_START="1", NGRAM_GATE_FIT_SECONDS=str(gate_fit_seconds))}


def run_mode(out: Path, run_id: str, env: dict) -> dict:
    """Train and score one mode; returns its log fields and dump path (SystemExit naming the log on failure)."""
    dump = out / f"{run_id}.npz"
    proc = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=out, stdout=subprocess.DEVNULL,
                          env=dict(os.environ, **env, RUN_ID=run_id, EVAL_DUMP=str(dump), PYTHONUNBUFFERED="1"))
    log = (out / "logs" / f"{run_id}.txt").read_text()
    if proc.returncode:
        raise SystemExit(f"{run_id} exited {proc.returncode}: see {out / 'logs' / (run_id + '.txt')}")
    last = [ln for ln in log.splitlines() if ln.startswith("step:") and "train_time:" in ln][-1]
    fit = log_fields(log, "gate_fit") if "\ngate_fit " in log else {}
    return dict(run_id=run_id, dump=dump, steps=int(last.split()[0].split(":")[1].split("/")[0]),
                train_ms=log_fields(last, "step:")["train_time"], fit_ms=fit.get("time", 0.0))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1337,42")
    parser.add_argument("--wallclock", type=float, default=0.0, help="seconds of training per mode (0: equal steps)")
    parser.add_argument("--gate-fit-seconds", type=float, default=15.0)
    parser.add_argument("--ttt", action="store_true", help="score with TTT too (the sample config's one epoch)")
    parser.add_argument("--modes", default="start0,start0.5,start0.9,gate_only,plain")
    parser.add_argument("--out", type=Path, default=Path("/tmp/mixer_modes"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = dict(read_env_file(REPO / "configs" / "sample_cpu.env"), DATA_PATH=str(SAMPLE_SHARDS),
                TOKENIZER_PATH=str(SAMPLE_TOKENIZER), VAL_LOSS_EVERY="0", TTT=str(int(args.ttt)))
    if args.wallclock:
        base.update(ITERATIONS="100000", MAX_WALLCLOCK_SECONDS=str(args.wallclock))
    settings = dict(modes(args.gate_fit_seconds), plain=dict(NGRAM="0"))
    chosen = args.modes.split(",")
    label = f"wall{args.wallclock:g}" if args.wallclock else "steps"
    print(f"{'run':>24} {'steps':>6} {'train s':>8} {'fit s':>6} {'neural':>8} {'system':>8}   ΔBPB vs start0 [95%]")
    for seed in args.seeds.split(","):
        reference = None  # start0's dump of this seed
        for name in chosen:
            r = run_mode(args.out, f"{label}_{name}_seed{seed}", dict(base, **settings[name], SEED=seed))
            dump = load_dump(r["dump"])
            total_bits = dump["bytes"].sum() * math.log(2)
            text = ""
            if name == "start0":
                reference = dump
            elif reference is not None:
                b = paired_bootstrap(dump["nll"] - reference["nll"], reference["bytes"], reference["doc_id"], 2000, 0)
                text = f"{b.delta_bpb:+.4f} [{b.low:+.4f}, {b.high:+.4f}]"
            print(f"{r['run_id']:>24} {r['steps']:>6} {r['train_ms'] / 1000:>8.1f} {r['fit_ms'] / 1000:>6.1f} "
                  f"{dump['neural_nll'].sum() / total_bits:>8.4f} {float(dump['val_bpb']):>8.4f}   {text}",
                  flush=True)


if __name__ == "__main__":
    main()
