"""Tests of analysis/probe_route.py on synthetic data: probe fitting finds a planted layer, the top-m router, the
draft acceptance proxy, the best-expert target and the document bootstrap. Seconds on CPU.

Run:  python -m pytest -q tests/test_probe_route.py
"""
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "analysis"))
import probe_route as pr  # noqa: E402


def planted_layers(num_layers=4, signal_layer=2, rows=3000, dim=16, classes=8, seed=0):
    """Features [L, 2*rows, D]: only `signal_layer` carries the class (its mean direction plus noise), every other
    layer is noise; the first `rows` rows train, the rest score."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (2 * rows,), generator=g)
    feats = torch.randn(num_layers, 2 * rows, dim, generator=g)
    directions = torch.randn(classes, dim, generator=g)
    feats[signal_layer] += 1.5 * directions[y]
    return feats[:, :rows], y[:rows], feats[:, rows:], y[rows:]


@pytest.mark.parametrize("signal_layer", [0, 2])
def test_probe_recovers_planted_layer(signal_layer):
    train_x, train_y, val_x, val_y = planted_layers(signal_layer=signal_layer)
    scores = pr.probe_layers(train_x, train_y, val_x, val_y, num_classes=8, epochs=5, lr=3e-2, seed=0)
    assert int(np.argmax(scores["top1"])) == signal_layer
    assert int(np.argmin(scores["nll"])) == signal_layer
    # the noise layers stay near chance (1/8); the planted one is far above it
    others = [s for i, s in enumerate(scores["top1"]) if i != signal_layer]
    assert scores["top1"][signal_layer] > 0.6 and max(others) < 0.25
    assert all(t1 <= t5 for t1, t5 in zip(scores["top1"], scores["top5"]))


def test_top_m_router_keeps_exactly_m_layers_and_follows_scores():
    scores = [0.10, 0.50, 0.30, 0.90, 0.20]
    logits = pr.router_logits_from_scores(scores)
    assert torch.equal(logits.argsort(), torch.tensor(scores).argsort())
    router = pr.TopMRouter(logits, m=2)
    w = router.weights().detach()
    assert int((w != 0).sum()) == 2 and set(w.nonzero().flatten().tolist()) == {3, 1}
    assert w[3] > w[1] and abs(float(w.sum()) - 1.0) < 1e-6
    # training moves the logits but the mix still reads exactly m layers
    optimizer = torch.optim.Adam(router.parameters(), lr=0.5)
    for _ in range(20):
        optimizer.zero_grad()
        (-router.weights()[1]).backward()
        optimizer.step()
    w = router.weights().detach()
    assert int((w != 0).sum()) == 2 and w[1] > 0.9
    with pytest.raises(ValueError, match="m=6"):
        pr.TopMRouter(logits, m=6)


def test_router_variants():
    scores = [0.2, 0.9, 0.1, 0.5]
    last = pr.make_router("last", 4, 2, scores, seed=0).weights()
    assert last.tolist() == [0.0, 0.0, 0.0, 1.0]
    dense = pr.make_router("dense", 4, 2, scores, seed=0).weights()
    assert torch.allclose(dense, torch.full((4,), 0.25))
    probe = pr.make_router("probe_sparse", 4, 2, scores, seed=0).weights()
    assert probe.nonzero().flatten().tolist() == [1, 3] and probe[1] > probe[3]
    assert int((pr.make_router("random_sparse", 4, 2, scores, seed=0).weights() != 0).sum()) == 2
    with pytest.raises(ValueError, match="unknown router variant"):
        pr.make_router("sparse", 4, 2, scores, seed=0)


def test_routed_linear_with_last_router_is_the_head_on_the_last_layer():
    feats = torch.randn(3, 5, 8)
    out = torch.nn.Linear(8, 4)
    head = pr.RoutedLinear(pr.make_router("last", 3, 1, None, seed=0), out)
    expected = out(torch.nn.functional.rms_norm(feats[-1], (8,)))
    assert torch.allclose(head(feats), expected, atol=1e-6)


def test_acceptance_proxy_hand_computed():
    # drafts of h = 2, 3, 4 against gold: accepted = 1 (own token) + leading run of hits
    correct = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 1]], dtype=torch.bool)
    accept = pr.acceptance_length(correct)
    assert accept.tolist() == [3.0, 1.0, 4.0, 1.0, 2.0]
    assert float(accept.mean()) == pytest.approx(11 / 5)


def test_best_expert_target():
    neural_lp = torch.log(torch.tensor([0.5, 0.1, 0.2]))
    probs = torch.tensor([[0.9, 0.3, 0.0], [0.6, 0.05, 0.7]])
    valid = torch.tensor([[False, True, True], [True, True, False]])
    # position 0: expert 0 invalid, expert 1 (0.6) beats neural (0.5); 1: expert 0 (0.3) wins; 2: neural (0.2)
    assert pr.best_expert(neural_lp, probs, valid).tolist() == [2, 1, 0]


def test_paired_bootstrap_over_documents():
    docs = np.repeat(np.arange(40), 25)
    rng = np.random.default_rng(0)
    same = rng.normal(size=docs.size)
    assert pr.paired_bootstrap(same - same, docs) == dict(mean=0.0, low=0.0, high=0.0, docs=40)
    shifted = pr.paired_bootstrap(np.full(docs.size, -0.1) + 0.01 * rng.normal(size=docs.size), docs)
    assert shifted["low"] <= shifted["mean"] <= shifted["high"] < 0
    assert shifted["mean"] == pytest.approx(-0.1, abs=0.005)
    # weights turn per-token sums into a ratio of sums (e.g. nats / (bytes * ln 2) for BPB)
    weighted = pr.paired_bootstrap(np.ones(docs.size), docs, weights=np.full(docs.size, 4.0))
    assert weighted["mean"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="differ"):
        pr.paired_bootstrap(np.ones(3), np.zeros(4, dtype=int))


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="ARTIFACT"):
        pr.main([str(tmp_path / "missing.ptz"), "--out", str(tmp_path)])
    artifact = tmp_path / "model.ptz"
    artifact.write_bytes(b"")
    with pytest.raises(ValueError, match="--seeds=0"):
        pr.main([str(artifact), "--out", str(tmp_path), "--seeds", "0"])


def test_plot_writes_png(tmp_path):
    grid = [[0.1 * (layer + 1) + 0.01 * h for h in range(4)] for layer in range(3)]
    mass = [[0.0, 0.0, 0.0], [0.4, 0.0, 1.0], [0.6, 1.0, 0.0]]
    result = dict(probe_map=dict(top1=grid, top5=grid, nll=grid),
                  mtp=dict(variants=dict(probe_sparse=dict(router_mass_by_h=mass))))
    pr.plot(result, tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
