"""The full system against the simplest valid mixture of the same model, from a run's per-target dump.

  python bench/simple_mixture.py RUN.npz [RUN2.npz ...] [--slices 4]

RUN.npz is an EVAL_DUMP of train_gpt.py on the sample val stream (its first len(positions) + 1 tokens). For each
dump it scores, on the same targets:
  classical cache   interpolated absolute discounting, D = 0.75, orders 1-5, counting every token before t
                    (ngram_mixer.smoothed_probs on NgramTables.counts): no neural model, every token p > 0;
  fixed lambda      lambda * p_model + (1 - lambda) * p_cache, with p_model the dump's neural probability of the
                    target (after TTT if the run used it) and one lambda fitted on the first 20% of the targets;
and prints BPB over all targets, over the last 80%, per slice, and the paired bootstrap interval (over documents,
records/compare.py) of the full system minus each. These are the two baselines a valid mixer should beat: the
simplest valid mixture, and on a weak model the classical cache alone.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ngram_mixer as nm  # noqa: E402
from devkit import SAMPLE_VAL_SHARD  # noqa: E402
from records.compare import bpb, fixed_mixture, load_dump, paired_bootstrap  # noqa: E402

CLASSICAL_ORDERS = (1, 2, 3, 4, 5)
CLASSICAL_DISCOUNT = 0.75
FIT_FRACTION = 0.2


def classical_cache_nll(tokens: torch.Tensor, vocab_size: int) -> np.ndarray:
    """NLL [N-1] (nats) of targets 1..N-1 under the classical cache of every earlier token."""
    counts = nm.NgramTables(vocab_size, CLASSICAL_ORDERS).counts(tokens, torch.arange(1, len(tokens)), chunk_start=0)
    return -np.log(nm.smoothed_probs(counts, vocab_size, CLASSICAL_DISCOUNT)[-1].double().numpy())


def report(path: Path, slices: int, vocab_size: int) -> None:
    dump = load_dump(path)
    n_targets = len(dump["nll"])
    raw = np.fromfile(SAMPLE_VAL_SHARD, dtype="<u2", offset=256 * 4)
    if n_targets + 1 > len(raw):
        raise ValueError(f"{path}: {n_targets} targets, but the sample val shard has only {len(raw)} tokens")
    tokens = torch.from_numpy(raw[:n_targets + 1].astype(np.int64))
    n_bytes, docs = dump["bytes"].astype(np.float64), dump["doc_id"]
    fit, rest = slice(0, int(FIT_FRACTION * n_targets)), slice(int(FIT_FRACTION * n_targets), None)
    cache = classical_cache_nll(tokens, vocab_size)
    lam, fixed = fixed_mixture(dump["neural_nll"], cache, fit)
    rows = {"neural (the dump)": dump["neural_nll"], "full system (the dump)": dump["nll"],
            "classical cache alone": cache, f"fixed lambda = {lam:.3f}, classical cache": fixed}
    bounds = np.linspace(0, n_targets, slices + 1).astype(int)
    print(f"\n{path} ({dump['run_id']}): {n_targets:,} targets, {int(n_bytes.sum()):,} bytes; logged val_bpb "
          f"{float(dump['val_bpb']):.4f}")
    print("| row | BPB | last 80% | " + " | ".join(f"slice {i + 1}" for i in range(slices)) + " |")
    print("|---|---|---|" + "---|" * slices)
    for name, nll in rows.items():
        per_slice = " | ".join(f"{bpb(nll[a:b], n_bytes[a:b]):.4f}" for a, b in zip(bounds[:-1], bounds[1:]))
        print(f"| {name} | {bpb(nll, n_bytes):.4f} | {bpb(nll[rest], n_bytes[rest]):.4f} | {per_slice} |")
    for name in list(rows)[2:]:
        result = paired_bootstrap(dump["nll"] - rows[name], n_bytes, docs, resamples=2000)
        print(f"full system - {name}: {result.delta_bpb:+.4f} [{result.low:+.4f}, {result.high:+.4f}] (95%, documents)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dumps", nargs="+", type=Path)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=1024)
    opts = parser.parse_args(argv)
    for path in opts.dumps:
        report(path, opts.slices, opts.vocab_size)


if __name__ == "__main__":
    main()
