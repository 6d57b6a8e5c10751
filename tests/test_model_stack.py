"""Tests of the model stack: each component's defining property, on CPU in seconds.

Run:  python -m pytest -q tests/test_model_stack.py
"""
import lzma
import os

import pytest
import torch
import torch.nn.functional as F
import zstandard

import train_gpt as tg
from devkit import read_env_file
from conftest import REPO_ROOT, SAMPLE_DATA_DIR, SAMPLE_TRAIN_SHARD, TINY_ENV, model_args, run_trainer


def stack_model(seed=0, vocab_size=1024, **overrides):
    """A small model with every switch of the stack on: 4 blocks, blocks 1-2 looped twice more."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, num_layers=4, model_dim=128, num_heads=2, num_kv_heads=1, mlp_mult=4,
                    rope_base=10000.0, logit_softcap=30.0, qk_gain_init=5.25, tied_embed_init_std=0.05,
                    mlp_negative_slope=0.5, rope_dims=16, ln_scale=True, skip_gates=True, parallel_residual_start=2,
                    xsa_last_n=4, num_loops=2, loop_start=1, loop_end=2, smear_gate_enabled=True,
                    sparse_attn_gate_enabled=True, gate_window=12, ngram=False)
    settings.update(overrides)
    model = tg.GPT(model_args(**settings), bos_id=1)
    with torch.no_grad():
        # Zero-initialized projections would hide most of the properties below.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def sample_batch(rows=4, seq_len=64, offset=0):
    tokens = tg.load_data_shard(SAMPLE_TRAIN_SHARD, 1024)[offset:offset + rows * seq_len]
    return tokens.long().reshape(rows, seq_len)


# ----- model -----

def test_recurrence_adds_no_block_parameters_and_repeats_the_looped_blocks_in_order():
    looped, plain = stack_model(), stack_model(num_loops=0)
    shapes = lambda m: {n: p.shape for n, p in m.named_parameters() if not n.startswith("skip_")}  # noqa: E731
    assert shapes(looped) == shapes(plain)
    # Only the skip weights differ: one row per encoder layer of the looped order (8 virtual layers -> 4).
    assert looped.skip_weights.shape[0] == 4 and plain.skip_weights.shape[0] == 2
    calls = []
    for i, block in enumerate(looped.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    ids = sample_batch(rows=1, seq_len=16)
    assert len(looped.layer_states(ids)) == 4 and calls == [0, 1, 2, 3]
    params_before = [p.clone() for p in looped.parameters()]
    calls.clear()
    looped.set_recurrence(True)
    assert len(looped.layer_states(ids)) == 8 and calls == [0, 1, 2, 1, 2, 1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(params_before, looped.parameters()))
    assert tg.virtual_layers(11, 2, 3, 5) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]


def test_parallel_residual_blocks_feed_attention_and_mlp_the_same_input():
    model = stack_model()
    seen = {}
    for i in (1, 2):  # block 1 sequential, block 2 parallel (PARALLEL_RESIDUAL_START=2)
        model.blocks[i].attn.register_forward_hook(lambda m, inp, out, i=i: seen.setdefault(("attn", i), inp[0]))
        model.blocks[i].mlp.register_forward_hook(lambda m, inp, out, i=i: seen.setdefault(("mlp", i), inp[0]))
    model.layer_states(sample_batch(rows=2, seq_len=32))
    assert model.blocks[2].parallel and not model.blocks[1].parallel
    assert torch.equal(seen["attn", 2], seen["mlp", 2])
    assert not torch.allclose(seen["attn", 1], seen["mlp", 1])


def test_partial_rope_rotates_only_the_first_dims():
    rotary = tg.Rotary(16, 10000.0)
    cos, sin = rotary(32, torch.float32)
    x = torch.randn(2, 4, 32, 64)
    y = tg.apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 16:], x[..., 16:])
    assert not torch.allclose(y[:, :, 1:, :16], x[:, :, 1:, :16])
    # A rotation: each rotated pair keeps its norm.
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:16] ** 2  # noqa: E731
    assert torch.allclose(pair_norm(y), pair_norm(x), atol=1e-5)


def test_xsa_removes_the_component_along_each_tokens_own_value():
    bsz, heads, kv_heads, seq_len, head_dim = 2, 4, 2, 8, 16
    y, v = torch.randn(bsz, heads, seq_len, head_dim), torch.randn(bsz, kv_heads, seq_len, head_dim)
    out = tg.exclusive_self_attention(y, v)
    v_of_head = v.repeat_interleave(heads // kv_heads, dim=1)  # SDPA's enable_gqa head -> KV-head mapping
    v_hat = F.normalize(v_of_head, dim=-1)
    assert (out * v_hat).sum(-1).abs().max() < 1e-5
    # Only that component goes: out + (y . v_hat) v_hat = y.
    assert torch.allclose(out + (y * v_hat).sum(-1, keepdim=True) * v_hat, y, atol=1e-5)


def test_leaky_relu_square_and_ln_scale():
    model = stack_model()
    assert [b.ln_scale for b in model.blocks] == pytest.approx([1.0, 2 ** -0.5, 3 ** -0.5, 0.5])
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 128)
    expected = F.linear(torch.where(mlp.fc(x) > 0, mlp.fc(x), 0.5 * mlp.fc(x)) ** 2, mlp.proj.weight)
    assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_smear_gate_adds_the_gated_previous_token_except_at_bos():
    smear = tg.SmearGate(window=4)
    x, ids = torch.randn(2, 6, 8), torch.tensor([[5, 7, 1, 9, 1, 3], [1, 2, 3, 4, 5, 6]])
    bos = torch.tensor(1)
    assert torch.equal(smear(x, ids, bos), x)  # lambda = 0 at init: the model without it
    with torch.no_grad():
        smear.weight.normal_()
        smear.scale.fill_(0.7)
    y = smear(x, ids, bos)
    assert torch.equal(y[:, 0], x[:, 0])
    for b in range(2):
        for t in range(1, 6):
            gate = 0.0 if ids[b, t] == 1 else 0.7 * torch.sigmoid(x[b, t, :4] @ smear.weight)
            assert torch.allclose(y[b, t], x[b, t] + gate * x[b, t - 1], atol=1e-6), (b, t)
    # Only the previous token: changing token t + 2 and later leaves positions <= t + 1 alone.
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 8)
    assert torch.equal(smear(x2, ids, bos)[:, :4], y[:, :4])


def test_sparse_attn_gate_scales_each_heads_output():
    model = stack_model(num_layers=1, num_loops=0, loop_end=-1, xsa_last_n=0)
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 128)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(128))  # the output is the heads' outputs side by side
        gate_weight = attn.head_gate.clone()
        attn.head_gate.zero_()
        ungated = attn(x)  # 2 sigmoid(0) = 1: zero init is the identity
        attn.head_gate.copy_(gate_weight)
        gated = attn(x)
    head_scale = 2 * torch.sigmoid(x[..., :12] @ gate_weight.T)  # [B, T, H]
    expected = (ungated.view(2, 16, 2, 64) * head_scale[..., None]).view(2, 16, 128)
    assert torch.allclose(gated, expected, atol=1e-5)
    assert not torch.allclose(gated, ungated)


# ----- optimizer, schedule, EMA -----

def test_polar_express_and_newton_schulz_orthogonalize():
    grad = torch.randn(64, 32)
    for polar in (False, True):
        singular = torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(grad, 5, polar_express=polar))
        assert 0.6 < singular.min() and singular.max() < 1.25, (polar, singular)


def test_muon_row_normalization_and_weight_decay():
    p = torch.nn.Parameter(torch.randn(8, 16))
    p.grad = torch.randn(8, 16) * torch.logspace(-3, 3, 8)[:, None]  # rows of very different scale
    before = p.detach().clone()
    opt = tg.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, row_normalize=True, weight_decay=0.5)
    opt.step()
    update = tg.zeropower_via_newtonschulz5(p.grad / p.grad.norm(dim=-1, keepdim=True), 5)
    assert torch.allclose(p.detach(), before * (1 - 0.1 * 0.5) - 0.1 * update, atol=1e-5)


def test_warmdown_fraction_follows_the_run_progress():
    args = tg.Hyperparameters()
    args.iterations, args.max_wallclock_seconds, args.warmdown_frac = 1000, 0, 0.72
    args.min_lr = 0.0
    assert tg.lr_scale(args, 280, 0.0) == 1.0
    assert tg.lr_scale(args, 640, 0.0) == pytest.approx(0.5)
    assert tg.lr_scale(args, 1000, 0.0) == 0.0
    # Under a wallclock cap the time is the progress when it runs ahead of the steps.
    args.max_wallclock_seconds = 100.0
    assert tg.lr_scale(args, 10, 64_000.0) == pytest.approx(0.5)
    assert tg.training_progress(args, 10, 35_000.0) == pytest.approx(0.35)
    # MIN_LR (PR #1787): the same line, from 1 down to the floor instead of 0.
    args.min_lr, args.max_wallclock_seconds = 0.1, 0
    assert tg.lr_scale(args, 280, 0.0) == 1.0
    assert tg.lr_scale(args, 640, 0.0) == pytest.approx(0.55)
    assert tg.lr_scale(args, 1000, 0.0) == pytest.approx(0.1)
    args.warmdown_frac = 0.0
    assert tg.lr_scale(args, 999, 0.0) == 1.0  # no warmdown


def test_ema_weights_are_the_ones_exported(tmp_path):
    args = tg.Hyperparameters()
    args.gptq_calib_batches, args.quant_bits, args.compressor = 0, 8, "zstd"
    # No SDClip: these shifted rows are far from zero-mean, so k * std would clip them.
    args.matrix_clip_sigmas = args.embed_clip_sigmas = 0.0
    model = stack_model()
    ema = tg.EMA(model, decay=0.5)
    start = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    params = dict(model.named_parameters())
    averaged = ema.state_dict(model)
    assert torch.equal(averaged["bos_id"], start["bos_id"])  # a buffer: not trained, so its average is itself
    for name in params:
        assert torch.allclose(averaged[name], start[name] + 0.5)
    (tmp_path / "ema.ptz").write_bytes(tg.export_artifact(args, model, ema, []))
    blob = tg.dequantize_state_dict(tg.load_artifact(tmp_path / "ema.ptz"))
    for name in params:
        assert torch.allclose(blob[name], start[name] + 0.5, atol=0.02), name


# ----- quantization + compression -----

def test_sdclip_scale_is_k_times_row_std():
    w = torch.randn(16, 4096)
    w[3, 7] = 100.0  # an outlier clips instead of stretching its row's grid
    scale = tg.sdclip_scale(w, 31, 12.85)
    assert torch.equal(scale, (12.85 * w.std(dim=1) / 31).half())
    blob = tg.quantize_state_dict({"w": w}, 6, clip_sigmas=12.85)
    assert int(blob["quantized"]["w"][3, 7]) == 31 and int(blob["quantized"]["w"].abs().max()) <= 31
    assert torch.equal(tg.sdclip_scale(w, 31, 0.0), (w.abs().amax(dim=1) / 31).half())


def test_gptq_reconstruction_error_is_below_round_to_nearest():
    model = stack_model()
    calib = [sample_batch(rows=8, seq_len=64)]
    hessians = tg.collect_hessians(model, calib)
    state = model.state_dict()
    gptq = tg.dequantize_state_dict(tg.quantize_state_dict(state, 6, hessians, clip_sigmas=12.85))
    rtn = tg.dequantize_state_dict(tg.quantize_state_dict(state, 6, None, clip_sigmas=12.85))
    # Includes the tied embedding (input: the final hidden state) and the MLP / attention matrices >= 65,536.
    assert {"tok_emb.weight", "blocks.0.mlp.fc.weight", "blocks.3.mlp.proj.weight"} <= set(hessians)
    for name, h in hessians.items():
        # sum over calibration inputs x of ||(W - W_hat) x||^2 = tr(E H E^T)
        err = lambda w_hat: torch.trace((state[name] - w_hat) @ h @ (state[name] - w_hat).T)  # noqa: E731
        assert err(gptq[name]) < err(rtn[name]), name


def test_lqer_corrects_the_matrices_where_it_removes_most_error():
    torch.manual_seed(0)
    # "rough" has 3x the scale of "plain", so 9x the squared rounding error for a correction to remove.
    state = {"plain": torch.randn(256, 512), "rough": 3 * torch.randn(256, 512)}
    base = tg.quantize_state_dict(state, 4)
    corrected = tg.quantize_state_dict(state, 4, lqer_rank=4, lqer_top_k=1)
    assert list(corrected["lqer"]) == ["rough"]  # the larger removable error
    a, b = corrected["lqer"]["rough"]
    assert a.shape == (256, 4) and b.shape == (4, 512) and a.dtype == b.dtype == torch.float16
    before, after = tg.dequantize_state_dict(base), tg.dequantize_state_dict(corrected)
    assert torch.equal(after["plain"], before["plain"])
    error = state["rough"] - before["rough"]
    top = float(torch.linalg.svdvals(error)[:4].square().sum())
    # The correction is the error's best rank-4 approximation (up to its fp16 factors).
    left = float((state["rough"] - after["rough"]).square().sum())
    assert left == pytest.approx(float(error.square().sum()) - top, rel=1e-3)


def test_artifact_reloads_bit_exactly_with_every_compressor(tmp_path):
    model = stack_model(num_layers=1, num_loops=0, loop_end=-1, xsa_last_n=1)
    hessians = tg.collect_hessians(model, [sample_batch(rows=2, seq_len=64)])
    blob = tg.quantize_state_dict(model.state_dict(), 6, hessians, 12.85, 8, 20.0, lqer_rank=4, lqer_top_k=2)
    assert len(blob["lqer"]) == 2
    expected = tg.dequantize_state_dict(blob)
    assert int(expected["bos_id"]) == 1  # SmearGate's BOS id travels in the artifact
    sizes = {}
    for compressor in tg.COMPRESSORS + ("best",):
        data = tg.compress_artifact(blob, compressor)
        sizes[compressor] = len(data)
        path = tmp_path / f"{compressor}.ptz"
        path.write_bytes(data)
        loaded = tg.load_artifact(path)
        assert tg.artifact_label(loaded).startswith("int6_gptq_")
        restored = tg.dequantize_state_dict(loaded)
        assert restored.keys() == expected.keys()
        assert all(torch.equal(restored[n], expected[n]) for n in expected)
    assert sizes["best"] == min(sizes[c] for c in tg.COMPRESSORS)
    data = b"\x00\x01\x02 arbitrary bytes \xff" * 3
    assert tg.byte_shuffle(tg.byte_shuffle(data), inverse=True) == data


def test_loader_rejects_files_without_the_artifact_header(tmp_path):
    import io
    buffer = io.BytesIO()
    torch.save(dict(tg.quantize_state_dict(stack_model().state_dict(), 8), __format__="int8_zstd_v1"), buffer)
    path = tmp_path / "old.ptz"
    # a bare zstd frame (the kit's format before the compressor header) and a header over garbage
    for raw in (zstandard.ZstdCompressor(level=3).compress(buffer.getvalue()),
                tg.ARTIFACT_MAGIC + bytes([1]) + lzma.compress(b"garbage")):
        path.write_bytes(raw)
        with pytest.raises(ValueError, match="not a b'PGA1' artifact"):
            tg.load_artifact(path)


def test_sp8192_shapes_quantize_the_embedding_at_embed_bits():
    model = stack_model(vocab_size=8192, model_dim=64, mlp_mult=2, num_layers=2, num_loops=0, loop_end=-1,
                        parallel_residual_start=-1)
    ids = torch.randint(0, 8192, (2, 32))
    loss, _, _ = model(ids[:, :-1], ids[:, 1:])
    assert torch.isfinite(loss)
    blob = tg.quantize_state_dict(model.state_dict(), 6, clip_sigmas=12.85, embed_bits=8, embed_clip_sigmas=20.0)
    assert blob["quantized"]["tok_emb.weight"].shape == (8192, 64)
    emb = model.tok_emb.weight.detach()
    assert torch.equal(blob["scales"]["tok_emb.weight"], (20.0 * emb.std(dim=1) / 127).half())  # int8 grid


def test_sp8192_sample_trains_and_scores(tmp_path):
    """A real sp8192 run: tokenizer trained on the bundled sample text with the official settings (data/
    build_shards.py, about a second), train + val shards in tmp_path, the trainer at VOCAB_SIZE=8192."""
    import subprocess
    import sys
    docs = SAMPLE_DATA_DIR / "fineweb_sample"
    tokenizer, data = tmp_path / "sp8192.model", tmp_path / "sp8192"
    for jsonl, split, extra in (("casefold_verify_docs_200.jsonl", "train", ["--train-tokenizer", "8192"]),
                                ("fineweb_val_head_901docs.jsonl", "val", [])):
        subprocess.run([sys.executable, str(REPO_ROOT / "data" / "build_shards.py"), str(docs / jsonl),
                        "--tokenizer", str(tokenizer), "--out-dir", str(data), "--split", split, "--threads", "1",
                        *extra], check=True, capture_output=True, timeout=120)
    proc, log = run_trainer(tmp_path, RUN_ID="sp8192", DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer),
                            VOCAB_SIZE="8192", TTT="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hparam vocab_size:8192" in log and "final_ngram_ttt_exact val_loss:" in log


@pytest.mark.parametrize("config, world_size, params", [
    ("competition_8xh100.env", 8, 35_945_605), ("baseline_2024.env", 8, 17_059_912), ("sample_cpu.env", 1, None)])
def test_presets_name_real_knobs_and_valid_settings(config, world_size, params):
    """Every preset knob exists and validates; the baseline preset has the challenge baseline's 17.06M parameters
    (DESIGN.md section 5; counted without the n-gram gate), the default stack 35.9M (of which SmearGate 13 and
    SparseAttnGate 11 x 8 x 12)."""
    import subprocess
    import sys
    env = read_env_file(REPO_ROOT / "configs" / config)
    assert {name.lower() for name in env} <= set(vars(tg.Hyperparameters()))
    # A fresh process, as a run would start with this preset.
    code = ("import torch, train_gpt as tg; a = tg.Hyperparameters(); tg.validate_hyperparameters(a, "
            f"{world_size}); a.ngram = False; print(sum(p.numel() for p in tg.GPT(a).to('meta').parameters()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=dict(os.environ, **env), check=True,
                         capture_output=True, text=True, timeout=120).stdout
    if params is not None:
        assert int(out) == params


def test_bad_loop_range_names_the_env_var():
    args = tg.Hyperparameters()
    args.num_layers, args.loop_end = 4, 5
    with pytest.raises(ValueError, match="LOOP_END=5"):
        tg.validate_hyperparameters(args, 1)


# ----- a whole tiny run with the default export (GPTQ int6 + SDClip, best compressor, EMA) -----

def test_default_export_run_reloads_digit_for_digit(tmp_path):
    stack = dict(QUANT_BITS="6", GPTQ_CALIB_BATCHES="2", COMPRESSOR="best", EMA_DECAY="0.5", NGRAM="0", TTT="0")
    assert set(stack) <= set(TINY_ENV) | {"EMA_DECAY", "NGRAM", "TTT"}
    proc, log = run_trainer(tmp_path, RUN_ID="stack", **stack)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exact = [ln for ln in log.splitlines() if ln.startswith("final_int6_gptq_") and "_roundtrip_exact" in ln]
    assert len(exact) == 1
    proc2, log2 = run_trainer(tmp_path, RUN_ID="stack-reload", EVAL_ARTIFACT=str(tmp_path / "final_model.stack.ptz"),
                              **stack)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert exact == [ln for ln in log2.splitlines() if ln.startswith("final_int6_gptq_") and "_exact" in ln]
