"""Tests of records/compare.py on synthetic EVAL_DUMP files with known answers: the paired bootstrap of ΔBPB over
documents or blocks, the dump checks, and the CLI's refusal of dumps that score different targets.

Run:  python -m pytest -q tests/test_compare.py      (a few seconds)
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from records.compare import block_ids, bpb, compare, fixed_mixture, load_dump, paired_bootstrap

LN2 = math.log(2)


def synthetic_targets(n_docs=400, seed=0):
    """Targets of n_docs documents of 20..200 targets each: (nll [N] float64, bytes [N] int64, doc_id [N] int64)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 200, n_docs)
    doc_id = np.repeat(np.arange(n_docs), lengths)
    target_bytes = rng.integers(1, 8, doc_id.size)
    nll = rng.gamma(2.0, 1.0, doc_id.size)
    return nll, target_bytes, doc_id


def write_dump(path, nll, target_bytes, doc_id, run_id="run", val_bpb=None, **replace):
    """An EVAL_DUMP file in train_gpt.py's format; val_bpb defaults to the one its arrays give."""
    n = nll.size
    arrays = dict(nll=nll.astype(np.float64), neural_nll=nll.astype(np.float64) + 0.1,
                  bytes=target_bytes.astype(np.int64), doc_id=doc_id.astype(np.int64),
                  positions=np.arange(1, n + 1, dtype=np.int64), gate_weights=np.full((n, 3), 1 / 3, np.float32),
                  val_loss=np.float64(nll.mean()), run_id=np.array(run_id))
    arrays["val_bpb"] = np.float64(nll.sum() / (LN2 * target_bytes.sum()) if val_bpb is None else val_bpb)
    arrays.update(replace)
    np.savez(path, **arrays)
    return path


def test_constant_shift_per_byte_gives_that_delta_and_a_degenerate_interval():
    nll, target_bytes, doc_id = synthetic_targets()
    # B costs exactly c bits more on every byte: every resample's ΔBPB is c.
    c = -0.0375
    result = paired_bootstrap(c * LN2 * target_bytes, target_bytes, doc_id, resamples=2000)
    assert result.delta_bpb == pytest.approx(c, rel=1e-12)
    assert result.low == pytest.approx(c, rel=1e-12) and result.high == pytest.approx(c, rel=1e-12)
    assert result.fraction_below_zero == 1.0 and result.units == 400 and result.deltas.shape == (2000,)


def test_independent_noise_gives_an_interval_around_zero_of_the_analytic_width():
    nll, target_bytes, doc_id = synthetic_targets(n_docs=1000)
    sigma = 0.5
    noise = np.random.default_rng(1).normal(0.0, sigma, nll.size)
    result = paired_bootstrap(noise, target_bytes, doc_id, resamples=4000, seed=3)
    assert result.low < 0 < result.high
    assert 0.1 < result.fraction_below_zero < 0.9
    # Independent targets: the ratio's standard error is about sigma sqrt(N) / (ln 2 Σ bytes).
    half_width = 1.959964 * sigma * math.sqrt(nll.size) / (LN2 * target_bytes.sum())
    assert (result.high - result.low) / 2 == pytest.approx(half_width, rel=0.15)


def test_documents_widen_the_interval_where_targets_within_a_document_correlate():
    nll, target_bytes, doc_id = synthetic_targets(n_docs=500, seed=2)
    rng = np.random.default_rng(4)
    # B is better on some documents and worse on others by a per-document amount shared by all its targets.
    per_doc = rng.normal(0.0, 0.3, 500)[doc_id]
    delta = per_doc + rng.normal(0.0, 0.05, nll.size)
    by_doc = paired_bootstrap(delta, target_bytes, doc_id, resamples=2000, seed=5)
    by_target = paired_bootstrap(delta, target_bytes, block_ids(nll.size, 1), resamples=2000, seed=5)
    assert by_target.units == nll.size and by_doc.units == 500
    assert by_doc.delta_bpb == by_target.delta_bpb
    # The naive interval treats ~55K correlated targets as independent: several times too narrow.
    assert (by_doc.high - by_doc.low) > 4 * (by_target.high - by_target.low)


def test_each_resample_is_a_ratio_of_sums_not_a_mean_of_unit_bpbs():
    # Unit 0: 1 byte, B worse by 10 bits; unit 1: 999 bytes, no change. Drawing one of each gives
    # 10 / 1000 = 0.01 BPB (a mean of per-unit BPBs would say 5). Draws: {0,0} 1/4 -> 10, {0,1} 1/2 -> 0.01,
    # {1,1} 1/4 -> 0; so the median resample is 0.01.
    delta, target_bytes, units = np.array([10 * LN2, 0.0]), np.array([1, 999]), np.array([7, 9])
    result = paired_bootstrap(delta, target_bytes, units, resamples=4000, seed=0)
    assert result.delta_bpb == pytest.approx(0.01, rel=1e-12)
    assert set(np.round(result.deltas, 12)) == {10.0, 0.01, 0.0}
    assert np.median(result.deltas) == pytest.approx(0.01)
    assert np.mean(result.deltas == 10.0) == pytest.approx(0.25, abs=0.03)
    assert (result.low, result.high) == (0.0, 10.0) and result.fraction_below_zero == 0.0


def test_blocks_cut_the_val_order():
    assert block_ids(7, 3).tolist() == [0, 0, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="at least one target"):
        block_ids(7, 0)


def test_bad_bootstrap_input_raises():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(np.zeros(3), np.ones(4), np.zeros(3))
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap(np.zeros(3), np.ones(3), np.zeros(3), resamples=0)


# ----- dumps and the CLI -----

def test_bpb_is_nats_over_bytes_for_numpy_and_torch():
    nll, target_bytes, _ = synthetic_targets(20)
    expected = nll.sum() / LN2 / target_bytes.sum()
    assert bpb(nll, target_bytes) == pytest.approx(expected, rel=1e-12)
    assert bpb(torch.from_numpy(nll), torch.from_numpy(target_bytes)) == pytest.approx(expected, rel=1e-12)


def test_fixed_mixture_recovers_the_weight_of_a_known_mixture():
    """Gold tokens drawn from 0.7 p_model + 0.3 p_other, where the two distributions over 4 tokens disagree: the
    λ fitted on the first half is near 0.7, and the NLL it returns is the mixture's at that λ on every target."""
    rng = np.random.default_rng(0)
    p_model, p_other = np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.05, 0.05, 0.1, 0.8])
    gold = np.where(rng.random(20_000) < 0.7, rng.choice(4, 20_000, p=p_model), rng.choice(4, 20_000, p=p_other))
    model_nll, other_nll = -np.log(p_model[gold]), -np.log(p_other[gold])
    lam, nll = fixed_mixture(model_nll, other_nll, slice(0, 10_000))
    assert lam == pytest.approx(0.7, abs=0.03)
    np.testing.assert_allclose(nll, -np.log(lam * p_model[gold] + (1 - lam) * p_other[gold]), rtol=1e-12)
    # an uninformative other distribution earns (almost) no weight
    lam, nll = fixed_mixture(model_nll, np.full_like(model_nll, np.log(1e6)), slice(None))
    assert lam > 0.999 and nll.mean() == pytest.approx(model_nll.mean(), abs=1e-3)


def test_compare_reports_both_scores_and_the_delta(tmp_path):
    nll, target_bytes, doc_id = synthetic_targets()
    a = write_dump(tmp_path / "a.npz", nll, target_bytes, doc_id, run_id="base")
    b = write_dump(tmp_path / "b.npz", nll - 0.02 * LN2 * target_bytes, target_bytes, doc_id, run_id="new")
    bpb_a = nll.sum() / (LN2 * target_bytes.sum())
    report = compare(a, b, blocks=None, resamples=500, seed=0)
    assert f"val_bpb {bpb_a:.6f}" in report and f"val_bpb {bpb_a - 0.02:.6f}" in report
    # write_dump's neural NLL is 0.1 nats above the full system's on every target.
    neural_a = (nll.sum() + 0.1 * nll.size) / (LN2 * target_bytes.sum())
    assert f"neural only {neural_a:.6f}" in report
    assert "ΔBPB = B - A = -0.020000, 95% interval [-0.020000, -0.020000]" in report
    assert "400 documents" in report and "(B better): 1.0000" in report
    assert "blocks of 1000 targets" in compare(a, b, blocks=1000, resamples=100, seed=0)


@pytest.mark.parametrize("key", ["positions", "bytes"])
def test_cli_refuses_dumps_of_different_targets(tmp_path, key):
    nll, target_bytes, doc_id = synthetic_targets()
    a = write_dump(tmp_path / "a.npz", nll, target_bytes, doc_id)
    changed = dict(positions=np.arange(2, nll.size + 2, dtype=np.int64)) if key == "positions" else {}
    other_bytes = target_bytes.copy()
    if key == "bytes":
        other_bytes[5] += 1
    b = write_dump(tmp_path / "b.npz", nll, other_bytes, doc_id, **changed)
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "records" / "compare.py"), str(a), str(b),
                           "--resamples", "10"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "do not score the same targets" in proc.stderr and f"{key}:" in proc.stderr and str(b) in proc.stderr


def test_cli_refuses_dumps_of_different_lengths(tmp_path):
    nll, target_bytes, doc_id = synthetic_targets()
    a = write_dump(tmp_path / "a.npz", nll, target_bytes, doc_id)
    b = write_dump(tmp_path / "b.npz", nll[:-1], target_bytes[:-1], doc_id[:-1])
    with pytest.raises(SystemExit, match=f"positions: {nll.size:,} vs {nll.size - 1:,} targets"):
        compare(a, b, blocks=None, resamples=10, seed=0)


def test_load_dump_checks_the_format_and_the_logged_score(tmp_path):
    nll, target_bytes, doc_id = synthetic_targets(n_docs=20)
    dump = load_dump(write_dump(tmp_path / "ok.npz", nll, target_bytes, doc_id, run_id="r1"))
    assert str(dump["run_id"]) == "r1" and dump["gate_weights"].shape == (nll.size, 3)
    # Without the mixer the gate has no columns.
    load_dump(write_dump(tmp_path / "plain.npz", nll, target_bytes, doc_id,
                         gate_weights=np.zeros((nll.size, 0), np.float32)))
    truncated = write_dump(tmp_path / "cut.npz", nll, target_bytes, doc_id, val_bpb=1.0)
    with pytest.raises(ValueError, match=r"cut.npz: .* but val_bpb = 1.0000000000"):
        load_dump(truncated)
    with pytest.raises(ValueError, match="bytes has dtype float64"):
        load_dump(write_dump(tmp_path / "f.npz", nll, target_bytes, doc_id, bytes=target_bytes.astype(float)))
    np.savez(tmp_path / "other.npz", nll=nll)
    with pytest.raises(ValueError, match="other.npz: not an EVAL_DUMP file: missing neural_nll"):
        load_dump(tmp_path / "other.npz")
