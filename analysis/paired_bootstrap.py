"""analysis/paired_bootstrap.py: a paired bootstrap interval for a BPB difference, resampling whole documents.

Local helper for analysis/layer_routing.py (records/compare.py's paired_bootstrap was not on this branch; the lead
may merge the two). Two configurations scored on the same targets give per-target NLL arrays; documents (a BOS id
starts one) are the resampling unit because tokens inside a document are correlated.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def document_ids(tokens: np.ndarray, bos_id: int = 1) -> np.ndarray:  # [N] int -> [N - 1] int64
    """The document of each target t = 1..N-1: the number of BOS tokens at positions <= t, minus one."""
    return np.cumsum(np.asarray(tokens) == bos_id)[1:].astype(np.int64) - 1


def paired_bootstrap_bpb(nll_a: np.ndarray, nll_b: np.ndarray, n_bytes: np.ndarray, doc_ids: np.ndarray,
                         n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """BPB(a) - BPB(b) over the same targets, with a BCa interval from resampling documents.
    nll_a, nll_b: [N] float (nats per target); n_bytes: [N] int; doc_ids: [N] int (0..D-1, every id present)."""
    if not (len(nll_a) == len(nll_b) == len(n_bytes) == len(doc_ids)):
        raise ValueError(f"paired_bootstrap_bpb: lengths differ ({len(nll_a)}, {len(nll_b)}, {len(n_bytes)}, "
                         f"{len(doc_ids)})")
    doc_ids = np.asarray(doc_ids) - np.min(doc_ids)
    # Per-document sums keep BPB a ratio of totals (sum NLL / ln 2 / sum bytes) in every resample.
    doc_a = np.bincount(doc_ids, weights=np.asarray(nll_a, dtype=np.float64))
    doc_b = np.bincount(doc_ids, weights=np.asarray(nll_b, dtype=np.float64))
    doc_bytes = np.bincount(doc_ids, weights=np.asarray(n_bytes, dtype=np.float64))

    def delta_bpb(a, b, by, axis=-1):
        return (a.sum(axis) - b.sum(axis)) / (math.log(2.0) * by.sum(axis))

    result = stats.bootstrap((doc_a, doc_b, doc_bytes), delta_bpb, paired=True, vectorized=True,
                             n_resamples=n_resamples, confidence_level=confidence, method="BCa",
                             random_state=np.random.default_rng(seed))
    return dict(delta_bpb=float(delta_bpb(doc_a, doc_b, doc_bytes)), low=float(result.confidence_interval.low),
                high=float(result.confidence_interval.high), documents=int(len(doc_a)), confidence=confidence)
