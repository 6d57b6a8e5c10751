"""The dump's prefix-only analysis fields (context_last_seen, model_context) against brute force, and
analysis/mixer_gain.py on a real run's dump."""
import math
import sys

import numpy as np
import pytest
import torch

import ngram_mixer as nm
from conftest import REPO_ROOT, run_trainer

sys.path.insert(0, str(REPO_ROOT / "analysis"))
import mixer_gain  # noqa: E402
import mixing_rule  # noqa: E402


def brute_last_seen(tokens: list[int], orders) -> tuple[list[int], list[int]]:
    order, distance = [0] * (len(tokens) - 1), [0] * (len(tokens) - 1)
    for t in range(1, len(tokens)):
        for n in orders:
            if t < n - 1:
                continue
            context = tokens[t - n + 1:t]
            earlier = [s for s in range(n - 1, t) if tokens[s - n + 1:s] == context]
            if earlier:
                order[t - 1], distance[t - 1] = n, t - earlier[-1]
    return order, distance


@pytest.mark.parametrize("vocab_size, n", [(3, 300), (1024, 200)])
def test_context_last_seen_matches_brute_force(vocab_size, n):
    tokens = torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(n))
    if vocab_size > 3:  # repeats for the long orders
        tokens[120:160] = tokens[20:60]
    orders = (2, 3, 4, 5, 6, 7)
    order, distance = nm.context_last_seen(tokens, orders, vocab_size)
    want_order, want_distance = brute_last_seen(tokens.tolist(), orders)
    assert order.tolist() == want_order and distance.tolist() == want_distance
    assert max(want_order) == 7


def test_context_last_seen_reads_only_the_prefix():
    tokens = torch.randint(0, 50, (400,), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[250:] = torch.randint(0, 50, (150,), generator=torch.Generator().manual_seed(1))
    a, b = (nm.context_last_seen(x, (2, 3, 4), 50) for x in (tokens, changed))
    # targets t <= 250 (index t - 1) read tokens < 250 only
    assert all(torch.equal(x[:250], y[:250]) for x, y in zip(a, b))


@pytest.mark.parametrize("n_tokens, seq_len, stride", [(1000, 64, 16), (300, 128, 128), (50, 64, 8)])
def test_model_context_is_what_the_scoring_window_read(n_tokens, seq_len, stride):
    start, lo, hi = nm.window_schedule(1, n_tokens, seq_len, stride)
    want = torch.zeros(n_tokens - 1, dtype=torch.int64)
    for s, a, b in zip(start.tolist(), lo.tolist(), hi.tolist()):
        for t in range(a, b):
            want[t - 1] = t - s
    assert torch.equal(nm.model_context(n_tokens, seq_len, stride), want)


def test_mixer_gain_on_a_run_dump(tmp_path, capsys):
    proc, _ = run_trainer(tmp_path, RUN_ID="gain", NGRAM="1", TTT="0", ITERATIONS="3",
                          EVAL_DUMP=str(tmp_path / "gain.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    dump = mixer_gain.load_gain_dump(tmp_path / "gain.npz")
    total = (dump["neural_nll"] - dump["nll"]).sum() / (math.log(2) * dump["bytes"].sum())
    rows = mixer_gain.gain_table(dump, resamples=200, seed=0)
    for split in ("context", "top expert", "confidence"):
        parts = [r for r in rows if r["split"] == split]
        assert sum(r["targets"] for r in parts) == pytest.approx(1.0)
        assert sum(r["part"] for r in parts) == pytest.approx(total, rel=1e-9)
        assert all(r["part_low"] <= r["part"] <= r["part_high"] for r in parts)
    mixer_gain.main([str(tmp_path / "gain.npz"), "--resamples", "100", "--out", str(tmp_path / "gain.png")])
    assert "| context | beyond window |" in capsys.readouterr().out and (tmp_path / "gain.png").stat().st_size

    # a ladder: the same targets with the gain scaled, so the fit's slope is known
    weaker = dict(dump)
    weaker["neural_nll"] = dump["neural_nll"] * 1.5
    weaker["nll"] = weaker["neural_nll"] - 0.5 * (dump["neural_nll"] - dump["nll"])
    weaker["val_bpb"] = weaker["nll"].sum() / (math.log(2) * dump["bytes"].sum())
    np.savez(tmp_path / "weaker.npz", **weaker)
    points, fit = mixer_gain.ladder([tmp_path / "weaker.npz", tmp_path / "gain.npz"], 200, 0, 1.06)
    assert points[0]["gain"] == pytest.approx(0.5 * points[1]["gain"])
    assert fit["slope"] == pytest.approx(-math.log(2) / math.log(1.5))
    assert fit["low"] <= fit["projection"] <= fit["high"]


def test_mixing_rules_on_a_run_artifact(tmp_path, monkeypatch):
    """analysis/mixing_rule.py: the enumerated n-gram distribution sums to 1 at every sampled target, α = 0 gives
    the model's own NLL, and both one-parameter rules are fitted inside their ranges."""
    proc, _ = run_trainer(tmp_path, RUN_ID="rules", NGRAM="1", TTT="0", ITERATIONS="3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from conftest import TINY_ENV
    for name, value in TINY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VAL_MAX_TOKENS", "4096")
    import ngram_mixer as nm
    import train_gpt as tg
    args = tg.Hyperparameters()
    got = mixing_rule.evaluate(tg, nm, args, tmp_path / "final_model.rules.ptz", samples=64)
    scores = got["scores"]
    assert scores["neural"].size == 64
    np.testing.assert_allclose(scores["loglin"](0.0), scores["neural"], rtol=0, atol=1e-6)  # float32 log_softmax
    assert np.isfinite(scores["loglin"](1.0)).all() and (scores["ngram"] > 0).all()
    out = mixing_rule.compare_rules(scores, resamples=100)
    assert out["samples"] == 32 and 0 < out["lam"] < 1 and 0 <= out["alpha"] <= 2


def test_mixer_gain_names_a_dump_without_its_fields(tmp_path):
    arrays = dict(nll=np.ones(4), neural_nll=np.ones(4), bytes=np.ones(4, dtype=np.int64),
                  doc_id=np.zeros(4, dtype=np.int64), positions=np.arange(1, 5), gate_weights=np.ones((4, 1)),
                  val_bpb=np.float64(1 / math.log(2)), val_loss=np.float64(1.0), run_id=np.str_("old"))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(SystemExit, match="old.npz: no neural_top_logprob"):
        mixer_gain.main([str(tmp_path / "old.npz")])
