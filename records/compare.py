r"""
records/compare.py: ΔBPB between two configurations scored on the same val targets, with a paired bootstrap 95%
interval, from their EVAL_DUMP files (train_gpt.py with EVAL_DUMP=path.npz).

  python records/compare.py base.npz new.npz                      # resample documents (doc_id)
  python records/compare.py base.npz new.npz --blocks 4096        # resample 4096-target blocks instead
  python records/compare.py base.npz new.npz --resamples 20000 --seed 1

ΔBPB = BPB(B) - BPB(A): negative means B is better. Both dumps must score the same targets (positions and bytes
equal), else it exits 1 naming what differs. The interval resamples whole units (documents, or contiguous blocks
of targets in val order) with replacement, the same units for A and B, and computes each resample's ΔBPB as
Σ ΔNLL / (ln 2 · Σ bytes) over the drawn units: the score's own ratio, not a mean of per-unit BPBs. Targets within a
document are correlated, so resampling single targets would give a falsely narrow interval.

Other tools import the core:  from records.compare import paired_bootstrap   (with the repo root on sys.path),
and the two figures every comparison starts from: bpb (a score) and fixed_mixture (the simplest valid mixture).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize

# Each dump array: its dtype kind ("f" float, "i" int) and number of dimensions.
DUMP_ARRAYS = dict(nll=("f", 1), neural_nll=("f", 1), bytes=("i", 1), doc_id=("i", 1), positions=("i", 1),
                   gate_weights=("f", 2))
DUMP_SCALARS = ("val_bpb", "val_loss", "run_id")
# The dump's BPB must reproduce its logged val_bpb; float64 sums of 62M terms agree far inside this.
BPB_REL_TOLERANCE = 1e-9
# Unit indices drawn per batch (int32, 40 MB): 200 resamples at a time over 50K documents, one at a time over
# 10M or more single targets.
RESAMPLE_BATCH_INDICES = 10_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """ΔBPB (B - A) of the whole set and its paired bootstrap percentile interval."""
    delta_bpb: float
    low: float
    high: float
    # Share of resamples with ΔBPB < 0 (B better).
    fraction_below_zero: float
    units: int
    resamples: int
    confidence: float
    # [resamples] float64: each resample's ΔBPB, for plots or other summaries.
    deltas: np.ndarray = field(repr=False)


def unit_sums(values: np.ndarray, unit_ids: np.ndarray) -> np.ndarray:
    """Σ values per unit, over the units that occur (in id order). values [N] float64, unit_ids [N] int64 >= 0."""
    counts = np.bincount(unit_ids)
    return np.bincount(unit_ids, weights=values, minlength=counts.size)[counts > 0]


def paired_bootstrap(delta_nll: np.ndarray, target_bytes: np.ndarray, unit_ids: np.ndarray,
                     resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> BootstrapResult:
    """Paired bootstrap of ΔBPB = Σ ΔNLL / (ln 2 · Σ bytes), resampling units with replacement.

    delta_nll [N] float: NLL(B) - NLL(A) in nats per target; target_bytes [N] int: bytes of each target;
    unit_ids [N] int: the resampling unit of each target (document or block); any integers, need not be contiguous.
    The interval is the percentile interval of the resampled ΔBPBs at `confidence`.
    """
    return ratio_bootstrap(delta_nll, np.asarray(target_bytes, dtype=np.float64) * math.log(2), unit_ids,
                           resamples, seed, confidence)


def ratio_bootstrap(numerator: np.ndarray, denominator: np.ndarray, unit_ids: np.ndarray,
                    resamples: int = 10_000, seed: int = 0, confidence: float = 0.95) -> BootstrapResult:
    """Σ numerator / Σ denominator with its percentile interval from resampling units: paired_bootstrap with
    denominator = ln 2 · bytes, or a mean per-target difference with denominator 1 (analysis tools). [N] each."""
    delta_nll, target_bytes, unit_ids = (np.asarray(a) for a in (numerator, denominator, unit_ids))
    if not (delta_nll.ndim == 1 and delta_nll.shape == target_bytes.shape == unit_ids.shape and delta_nll.size):
        raise ValueError(f"paired_bootstrap: delta_nll, target_bytes and unit_ids must be equal-length non-empty 1-D "
                         f"arrays, got shapes {delta_nll.shape}, {target_bytes.shape}, {unit_ids.shape}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: resamples {resamples} must be >= 1 and confidence {confidence} in (0, 1)")
    ids = unit_ids.astype(np.int64)
    ids = ids - ids.min()
    # Per-unit sums first: a resample is then a draw of units, whatever their lengths.
    unit_nll = unit_sums(delta_nll.astype(np.float64), ids)
    unit_bytes = unit_sums(target_bytes.astype(np.float64), ids)
    n_units = unit_nll.size
    rng = np.random.default_rng(seed)
    deltas = np.empty(resamples)
    batch = max(1, RESAMPLE_BATCH_INDICES // n_units)
    for start in range(0, resamples, batch):
        # Row r holds the n_units unit indices drawn (with replacement) for resample r. int32 indices halve the
        # memory traffic of int64: nearly twice as fast at 50K units.
        drawn = rng.integers(0, n_units, size=(min(batch, resamples - start), n_units), dtype=np.int32)
        deltas[start:start + drawn.shape[0]] = unit_nll[drawn].sum(axis=1) / unit_bytes[drawn].sum(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    point = delta_nll.sum(dtype=np.float64) / target_bytes.sum(dtype=np.float64)
    return BootstrapResult(float(point), float(low), float(high), float((deltas < 0).mean()), n_units, resamples,
                           confidence, deltas)


def bpb(nll, target_bytes) -> float:
    """Bits per byte of per-target NLLs [N] (nats) over their bytes [N]: Σ nll / (ln 2 · Σ bytes). numpy or torch."""
    return float(nll.sum()) / (math.log(2) * float(target_bytes.sum()))


def fixed_mixture(model_nll: np.ndarray, other_nll: np.ndarray, fit) -> tuple[float, np.ndarray]:
    """The simplest valid mixture of two full distributions: λ·p_model + (1 − λ)·p_other at every target, one λ
    fitted (bounded scalar search) on the mean NLL of the targets `fit` selects (a slice or index array).
    model_nll, other_nll [N] nats of the gold token. Returns λ and the mixture's NLL [N] float64 (nats)."""
    model_lp, other_lp = -np.asarray(model_nll, dtype=np.float64), -np.asarray(other_nll, dtype=np.float64)

    def mixture_nll(lam: float) -> np.ndarray:
        return -np.logaddexp(np.log(lam) + model_lp, np.log1p(-lam) + other_lp)

    lam = optimize.minimize_scalar(lambda x: mixture_nll(x)[fit].mean(), bounds=(1e-4, 1 - 1e-4), method="bounded",
                                   options=dict(xatol=1e-5)).x
    return float(lam), mixture_nll(lam)


def document_ids(tokens: np.ndarray, bos_id: int = 1) -> np.ndarray:  # [N] int -> [N - 1] int64
    """The document of each target t = 1..N-1 of a token stream (a BOS token starts one): the number of BOS tokens
    at positions <= t, minus one; the same rule as EVAL_DUMP's doc_id."""
    return np.cumsum(np.asarray(tokens) == bos_id)[1:].astype(np.int64) - 1


def block_ids(n_targets: int, block: int) -> np.ndarray:
    """Unit id of each target when the val order is cut into blocks of `block` targets (the last may be shorter)."""
    if block < 1:
        raise ValueError(f"--blocks {block}: a block holds at least one target")
    return np.arange(n_targets, dtype=np.int64) // block


# -----------------------------
# DUMPS
# -----------------------------

def load_dump(path: Path) -> dict[str, np.ndarray]:
    """An EVAL_DUMP file's arrays, checked: the keys, dtypes and lengths of the format, and Σ nll / (ln 2 Σ bytes)
    equal to its val_bpb. ValueError naming the file and the problem otherwise."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as npz:
        dump = {key: npz[key] for key in npz.files}
    missing = [key for key in (*DUMP_ARRAYS, *DUMP_SCALARS) if key not in dump]
    if missing:
        raise ValueError(f"{path}: not an EVAL_DUMP file: missing {', '.join(missing)}")
    n_targets = dump["nll"].shape[0] if dump["nll"].ndim == 1 else -1
    for key, (kind, ndim) in DUMP_ARRAYS.items():
        array = dump[key]
        if array.dtype.kind != kind or array.ndim != ndim or array.shape[0] != n_targets:
            raise ValueError(f"{path}: {key} has dtype {array.dtype} and shape {array.shape}; expected a {ndim}-D "
                             f"{'float' if kind == 'f' else 'integer'} array of {n_targets} rows (one per target)")
    score = bpb(dump["nll"], dump["bytes"])
    if not math.isclose(score, float(dump["val_bpb"]), rel_tol=BPB_REL_TOLERANCE):
        raise ValueError(f"{path}: Σ nll / (ln 2 Σ bytes) = {score:.10f} but val_bpb = "
                         f"{float(dump['val_bpb']):.10f}: the dump is incomplete or not this run's")
    return dump


def first_difference(name: str, a: np.ndarray, b: np.ndarray) -> str | None:
    if a.shape != b.shape:
        return f"{name}: {a.shape[0]:,} vs {b.shape[0]:,} targets"
    unequal = np.flatnonzero(a != b)
    if unequal.size:
        i = unequal[0]
        return f"{name}: {unequal.size:,} targets differ, first at index {i} ({a[i]} vs {b[i]})"
    return None


def compare(path_a: Path, path_b: Path, blocks: int | None, resamples: int, seed: int) -> str:
    """The comparison report of two dumps; SystemExit naming the files when they do not score the same targets."""
    try:
        a, b = load_dump(path_a), load_dump(path_b)
    except ValueError as err:
        raise SystemExit(f"compare.py: {err}")
    differences = [d for d in (first_difference(key, a[key], b[key]) for key in ("positions", "bytes", "doc_id"))
                   if d is not None]
    if differences:
        raise SystemExit(f"compare.py: {path_a} and {path_b} do not score the same targets:\n  "
                         + "\n  ".join(differences))
    units = block_ids(a["nll"].size, blocks) if blocks else a["doc_id"]
    result = paired_bootstrap(b["nll"] - a["nll"], a["bytes"], units, resamples, seed)
    unit_name = f"blocks of {blocks} targets" if blocks else "documents"

    def scores(dump: dict) -> str:
        # The neural-only score tells whether a difference comes from the model or from the mixer.
        return (f"(run_id {dump['run_id']}): val_bpb {float(dump['val_bpb']):.6f}, neural only "
                f"{bpb(dump['neural_nll'], dump['bytes']):.6f}")

    return "\n".join([
        f"targets {a['nll'].size:,}, bytes {int(a['bytes'].sum()):,}, {result.units:,} {unit_name}",
        f"A {path_a} {scores(a)}",
        f"B {path_b} {scores(b)}",
        f"ΔBPB = B - A = {result.delta_bpb:+.6f}, {result.confidence:.0%} interval [{result.low:+.6f}, "
        f"{result.high:+.6f}] (paired bootstrap over {unit_name}, {resamples:,} resamples, seed {seed})",
        f"fraction of resamples with ΔBPB < 0 (B better): {result.fraction_below_zero:.4f}",
    ])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump_a", type=Path, help="EVAL_DUMP .npz of the reference configuration (A)")
    parser.add_argument("dump_b", type=Path, help="EVAL_DUMP .npz of the configuration compared with it (B)")
    parser.add_argument("--blocks", type=int, default=None,
                        help="resample contiguous blocks of this many targets instead of documents")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    args = parser.parse_args(argv)
    if args.blocks is not None and args.blocks < 1:
        parser.error(f"--blocks {args.blocks}: a block holds at least one target")
    if args.resamples < 1:
        parser.error(f"--resamples {args.resamples}: at least one resample")
    report = compare(args.dump_a, args.dump_b, args.blocks, args.resamples, args.seed)
    print(report)
    return report


if __name__ == "__main__":
    main()
