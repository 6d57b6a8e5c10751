r"""
records/prove_causality.py: the strongest check a reviewer can run on a scored artifact. It evaluates the artifact
twice with the trainer's own evaluation, once on the val stream and once with every val token after K replaced
by a random different id, and checks that every per-target loss up to K (target K included) is bit-identical in
the two EVAL_DUMPs. A score that depends on anything after its target, through the model, the experts, the
cache, TTT, the online gate or any other state, changes some loss up to K; an honest evaluation cannot.

  set -a; . configs/sample_cpu.env; set +a            # the settings the artifact was evaluated with
  python records/prove_causality.py final_model.<RUN_ID>.ptz [--after K] [--nproc 8] [--out DIR]
  python records/prove_causality.py ART --trainer records/track_10min_16mb/<record>/train_gpt.py

Settings come from the environment, as for train_gpt.py; both evaluations run with the same audit seed and the
same number of processes (NPROC, torchrun when > 1), so the two passes run identical kernels on identical
shapes. Without --after, K is drawn at random in [1, N - 2] (the run's val targets). It writes DIR/plain.npz,
DIR/replaced.npz, the two logs and DIR/causality_proof.json (pass or fail, the first differing target), prints
one `causality_proof` line and exits 1 when a loss differs. records/package.py --causality-proof attaches the
JSON to a record folder. The cost is two evaluations of the artifact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from devkit import parse_log  # noqa: E402
from ngram_mixer import first_difference  # noqa: E402

# The per-target arrays that must not move (EVAL_DUMP's): the system's loss, the model's, the gate's weights,
# and the prefix-only analysis fields (the last two only with the mixer on).
COMPARED = ("nll", "neural_nll", "gate_weights", "neural_top_logprob", "longest_order", "last_seen")


def evaluate(trainer: Path, artifact: Path, run_id: str, dump: Path, nproc: int, **settings) -> Path:
    """Run the trainer's evaluation of `artifact` (EVAL_ARTIFACT) with EVAL_DUMP=dump; returns its log path."""
    env = dict(os.environ, EVAL_ARTIFACT=str(artifact), EVAL_DUMP=str(dump), RUN_ID=run_id,
               **{name: str(value) for name, value in settings.items()})
    launcher = [sys.executable] if nproc <= 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + [str(trainer)], env=env, capture_output=True, text=True)
    log = Path("logs") / f"{run_id}.txt"
    if proc.returncode != 0 or not dump.is_file():
        raise SystemExit(f"prove_causality: the evaluation {run_id} failed (exit {proc.returncode}); log {log}:\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return log


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="final_model.<RUN_ID>.ptz")
    parser.add_argument("--after", type=int, default=None, help="K: tokens after K are replaced (default: random)")
    parser.add_argument("--nproc", type=int, default=int(os.environ.get("NPROC", 1)), help="processes per run")
    parser.add_argument("--trainer", type=Path, default=REPO_ROOT / "train_gpt.py",
                        help="the train_gpt.py to evaluate with (a record folder's copy, say)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (must not exist)")
    args = parser.parse_args(argv)
    if not args.artifact.is_file():
        raise SystemExit(f"prove_causality: no artifact at {args.artifact}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(f"causality_{args.artifact.stem}_{stamp}")
    if out.exists():
        raise SystemExit(f"prove_causality: {out} exists; choose another --out so earlier proofs are kept")
    out.mkdir(parents=True)
    # One audit seed for both passes, so nothing but the replaced tokens differs between them.
    audit_seed = secrets.randbelow(2**31 - 1) + 1
    plain_log = evaluate(args.trainer, args.artifact, f"causality_{stamp}_plain", out / "plain.npz", args.nproc,
                         AUDIT_SEED=audit_seed)
    plain = dict(np.load(out / "plain.npz"))
    n_targets = len(plain["nll"])
    after = args.after if args.after is not None else 1 + secrets.randbelow(n_targets - 2)
    if not 1 <= after <= n_targets - 2:
        raise SystemExit(f"prove_causality: --after {after} must be in [1, {n_targets - 2}] (this run's targets)")
    replaced_log = evaluate(args.trainer, args.artifact, f"causality_{stamp}_replaced", out / "replaced.npz",
                            args.nproc, AUDIT_SEED=audit_seed, VAL_REPLACE_AFTER=after)
    replaced = dict(np.load(out / "replaced.npz"))
    compared = [name for name in COMPARED if name in plain]
    found = first_difference([torch.from_numpy(plain[name]) for name in compared],
                             [torch.from_numpy(replaced[name]) for name in compared], after)
    difference = None if found is None else dict(target=found[0], largest_change=found[1])
    # The replaced stream must really differ after K, or the proof proves nothing.
    moved = int((plain["nll"][after:] != replaced["nll"][after:]).sum())
    run = parse_log(plain_log)
    proof = dict(passed=difference is None and moved > 0, after=after, targets_compared=after,
                 targets_moved_after=moved, first_difference=difference, artifact=str(args.artifact),
                 artifact_sha256=sha256(args.artifact), code_sha256=run.code_sha256, world_size=run.world_size,
                 val_tokens=run.val_tokens, audit_seed=audit_seed, logs=[str(plain_log), str(replaced_log)])
    (out / "causality_proof.json").write_text(json.dumps(proof, indent=2) + "\n")
    for log in (plain_log, replaced_log):
        (out / log.name).write_bytes(log.read_bytes())
    print(f"causality_proof after:{after} targets:{after} identical:{difference is None} "
          f"moved_after:{moved} passed:{proof['passed']} -> {out / 'causality_proof.json'}")
    if difference is not None:
        print(f"target {difference['target']}'s loss changed when tokens after {after} were replaced (by up to "
              f"{difference['largest_change']:.3e} over targets up to {after})")
    return 0 if proof["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
