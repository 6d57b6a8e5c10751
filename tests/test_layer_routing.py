"""Tests of analysis/layer_routing.py: exactness at skip ratio 0, gather path == masked path, causality with routing.

Run:  python -m pytest -q tests/test_layer_routing.py
"""
import sys

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "analysis"))
import train_gpt as tg  # noqa: E402
import layer_routing as lr  # noqa: E402
from records.compare import document_ids  # noqa: E402

SEQ_LEN = 48


def tiny_model(seed=0, num_layers=4):
    """A randomly initialized train_gpt.GPT with small settings; the zero-initialized output
    projections get random weights so that every block changes its input and attention matters."""
    args = tg.Hyperparameters()
    # The default stack at a tiny shape: partial RoPE within the 8-dim heads, XSA, parallel residuals; no depth
    # recurrence (the router does not choose loops) and additive U-net skips (the reference below adds them).
    for name, value in dict(num_layers=num_layers, model_dim=32, num_heads=4, num_kv_heads=2, vocab_size=1024,
                            ngram=False, rope_dims=4, num_loops=0, parallel_residual_start=num_layers - 1,
                            skip_gates=False).items():
        setattr(args, name, value)
    torch.manual_seed(seed)
    model = tg.GPT(args).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.normal_(std=0.1)
            block.mlp.proj.weight.normal_(std=0.1)
    return model.requires_grad_(False)


def input_ids(batch=3, seed=1):
    return torch.randint(0, 1024, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def trained_like_router(routed, seed=2):
    torch.manual_seed(seed)
    router = lr.TokenRouter(32, routed.num_routed)
    # Random weights and no keep bias: a mix of kept and skipped tokens that varies with the token.
    torch.nn.init.normal_(router.out.weight, std=1.0)
    torch.nn.init.zeros_(router.out.bias)
    return router


def test_skip_ratio_zero_equals_full_model_exactly():
    model = tiny_model()
    routed = lr.RoutedGPT(model, keep_first=1)
    ids = input_ids()
    # A shift this large keeps every token in every layer: the hard router at skip ratio 0.
    policy = lr.HardRouterPolicy(trained_like_router(routed), shift=1e9)
    with torch.inference_mode():
        h, gates = routed.hidden(ids, policy)
        full = model.hidden(ids)
    assert gates.min() == 1
    assert torch.equal(h, full)


@pytest.mark.parametrize("keep_first", [1, 2])
def test_gather_path_equals_masked_path(keep_first):
    model = tiny_model()
    routed = lr.RoutedGPT(model, keep_first=keep_first)
    ids = input_ids()
    policy = lr.HardRouterPolicy(trained_like_router(routed))
    with torch.inference_mode():
        h_gather, gates = routed.hidden(ids, policy, mode="gather")
        h_masked, gates_masked = routed.hidden(ids, policy, mode="masked")
        full = model.hidden(ids)
    skip_share = 1 - float(gates.mean())
    assert 0.2 < skip_share < 0.8, "the test needs a real mix of kept and skipped tokens"
    assert torch.equal(gates, gates_masked)
    torch.testing.assert_close(h_gather, h_masked, atol=2e-5, rtol=1e-5)
    # Skipping changed the outputs: the paths are not trivially the full model.
    assert (h_gather - full).abs().max() > 1e-2


def test_gather_path_matches_per_sequence_run_with_original_positions():
    """One routed layer: each sequence's kept tokens run alone through the block with the rotary table read at
    their original positions (the documented key/value rule), and skipped tokens pass through."""
    model = tiny_model()
    routed = lr.RoutedGPT(model, keep_first=3)
    ids = input_ids()
    policy = lr.HardRouterPolicy(trained_like_router(routed))
    with torch.inference_mode():
        h, gates = routed.hidden(ids, policy)
        states = model.layer_states(ids)
        x0 = torch.nn.functional.rms_norm(model.tok_emb(ids), (32,))
        # Input of block 3 = output of block 2 plus the U-net skip from block 0 (4 layers, 2 encoder blocks).
        x_in = states[2] + model.skip_weights[1] * states[0]
        rotary = routed.model.blocks[3].rotaries[0]
        expected = x_in.clone()
        for b in range(len(ids)):
            kept = gates[b, :, 0].nonzero().flatten()
            rotary.positions = kept[None]
            try:
                y = routed.model.blocks[3].block(x_in[b:b + 1, kept], x0[b:b + 1, kept])
            finally:
                rotary.positions = None
            expected[b, kept] = y[0]
        expected = model.final_norm(expected)
    torch.testing.assert_close(h, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["gather", "masked"])
def test_routing_is_causal(mode):
    model = tiny_model()
    routed = lr.RoutedGPT(model, keep_first=1)
    policy = lr.HardRouterPolicy(trained_like_router(routed))
    ids = input_ids(batch=2)
    with torch.inference_mode():
        h, gates = routed.hidden(ids, policy, mode=mode)
        for t in (5, 20, SEQ_LEN - 2):
            changed = ids.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 17) % 1024
            h_changed, gates_changed = routed.hidden(changed, policy, mode=mode)
            assert torch.equal(gates[:, :t + 1], gates_changed[:, :t + 1])
            # Not bit-exact in the gather path: a changed decision at t + 1 can change the padded width, and with it
            # the float rounding of SDPA's reductions; information from t + 1 would show as differences >> 1e-6.
            torch.testing.assert_close(h[:, :t + 1], h_changed[:, :t + 1], atol=1e-6, rtol=0)
            assert (h[:, t + 1] - h_changed[:, t + 1]).abs().max() > 1e-3


def test_router_training_reaches_its_skip_target_and_gradients_flow():
    model = tiny_model()
    routed = lr.RoutedGPT(model, keep_first=1)
    batches = torch.randint(0, 1024, (30, 4, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    router, losses = lr.train_router(routed, batches, lr.teacher_log_probs(model, batches), target_skip=0.5,
                                     lr=3e-2, sparsity_weight=0.01, target_weight=10.0, tau=1.0, seed=0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    assert not any(p.grad is not None for p in routed.parameters()), "the backbone must stay frozen"
    shift = lr.calibrate_shift(routed, router, batches[0], 0.5)
    with torch.inference_mode():
        _, gates = routed.hidden(batches[0], lr.HardRouterPolicy(router, shift))
    assert abs(float(gates.mean()) - 0.5) < 0.02


def test_static_and_random_policies():
    model = tiny_model()
    routed = lr.RoutedGPT(model, keep_first=1)
    ids = input_ids()
    with torch.inference_mode():
        # Dropping every routed layer leaves block 0's output s0, plus the model's own U-net skips (both carry s0).
        h, _ = routed.hidden(ids, lr.static_policy(torch.zeros(3)))
        s0 = model.layer_states(ids)[0]
        assert torch.equal(h, model.final_norm(s0 + model.skip_weights[0] * s0 + model.skip_weights[1] * s0))
        _, gates = routed.hidden(torch.zeros(64, SEQ_LEN, dtype=torch.long),
                                 lr.random_policy(torch.tensor([1.0, 0.5, 0.0]), seed=0))
    assert gates[..., 0].min() == 1 and gates[..., 2].max() == 0
    assert abs(float(gates[..., 1].mean()) - 0.5) < 0.03


def test_keep_first_out_of_range_raises():
    with pytest.raises(ValueError, match="--keep-first 4"):
        lr.RoutedGPT(tiny_model(), keep_first=4)


def test_document_ids_follow_bos_tokens():
    tokens = torch.tensor([1, 5, 6, 1, 7, 1, 8, 9]).numpy()
    assert document_ids(tokens).tolist() == [0, 0, 1, 1, 2, 2, 2]
