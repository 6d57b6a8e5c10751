"""Tests of the trainer: data, byte counting, evaluation windows, quantization, and whole runs.

Run:  python -m pytest -q tests/test_train_gpt.py
"""
import contextlib
import math
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ngram_mixer as nm  # noqa: E402
import train_gpt as tg
from conftest import (BASELINE_MODEL, REPO_ROOT, log_fields, SAMPLE_TOKENIZER, SAMPLE_TRAIN_SHARD, SAMPLE_VAL_SHARD,
                      TINY_ENV, log_value, model_args, run_trainer)


def tiny_model(num_experts=0, seed=0, document_order=0):
    """num_experts table orders 2 .. 1 + num_experts, and the document cache's orders 1..document_order (0: none)."""
    torch.manual_seed(seed)
    args = model_args(**BASELINE_MODEL, vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                      mlp_mult=2, qk_gain_init=1.5, tied_embed_init_std=0.05)
    args.ngram, args.ngram_max_order = num_experts > 0, 1 + max(num_experts, 1)
    args.ngram_doc_order = document_order
    args.ngram_train_stride = 1  # the tests that train it pass experts for every target
    return tg.GPT(args)


def make_setup(model, tokens, seq_len, stride, windows_per_batch=3, rank=0, world_size=1):
    byte_tables = tg.build_byte_tables(tg.load_tokenizer(str(SAMPLE_TOKENIZER), 1024), 1024, torch.device("cpu"))
    return tg.EvalSetup(model, model.hidden, tokens, byte_tables, seq_len, stride, windows_per_batch, rank, world_size)


# ----- data -----

def write_shard(path, header, tokens):
    with open(path, "wb") as f:
        f.write(np.asarray(header, dtype="<i4").tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def test_shard_reader_accepts_sample():
    assert tg.read_shard_header(SAMPLE_VAL_SHARD) == 1_040_060
    tokens = tg.load_data_shard(SAMPLE_VAL_SHARD, 1024)
    assert len(tokens) == 1_040_060 and int(tokens[0]) == 1  # BOS, not a header int


@pytest.mark.parametrize("header_patch, n_tokens, message", [
    ({0: 12345}, 10, "bad shard magic 12345"),
    ({1: 7}, 10, "unsupported shard version 7"),
    ({2: 11}, 10, "header says 11 tokens"),
    ({2: 9}, 10, "header says 9 tokens"),
])
def test_shard_reader_rejects_corrupt_headers(tmp_path, header_patch, n_tokens, message):
    header = [tg.SHARD_MAGIC, tg.SHARD_VERSION, n_tokens] + [0] * 253
    for index, value in header_patch.items():
        header[index] = value
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, header, range(n_tokens))
    with pytest.raises(ValueError, match=message) as err:
        tg.load_data_shard(path, 1024)
    assert str(path) in str(err.value)


def test_shard_reader_rejects_truncated_file_and_large_token(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="shorter than the 1024-byte shard header"):
        tg.read_shard_header(short)
    bad = tmp_path / "bad.bin"
    write_shard(bad, [tg.SHARD_MAGIC, tg.SHARD_VERSION, 4] + [0] * 253, [1, 5, 2000, 3])
    with pytest.raises(ValueError, match="token id 2000 at index 2 is >= VOCAB_SIZE=1024"):
        tg.load_data_shard(bad, 1024)


def test_missing_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no val shards match"):
        tg.list_shards(str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(tmp_path / "nope.model"), 1024)
    with pytest.raises(ValueError, match="VOCAB_SIZE=2048"):
        tg.load_tokenizer(str(SAMPLE_TOKENIZER), 2048)


def test_byte_luts_count_sample_val_bytes(sample_val_tokens):
    byte_tables = tg.build_byte_tables(tg.load_tokenizer(str(SAMPLE_TOKENIZER), 1024), 1024, torch.device("cpu"))
    n_bytes = nm.count_target_bytes(sample_val_tokens[:-1], sample_val_tokens[1:], byte_tables).sum()
    assert int(n_bytes) == 2_504_310


def test_loader_global_batch_does_not_depend_on_world_size():
    files = [SAMPLE_TRAIN_SHARD]
    cpu = torch.device("cpu")
    single = tg.DistributedTokenLoader(files, 0, 1, cpu, 1024, 512)
    pair = [tg.DistributedTokenLoader(files, r, 2, cpu, 1024, 512) for r in range(2)]
    everything = tg.load_data_shard(SAMPLE_TRAIN_SHARD, 1024).long()
    assert single.span_starts == [513 * m for m in range(8)]
    # Rank r's m-th micro-batch is span 2m + r: together the ranks cover the same 8 spans.
    assert pair[0].span_starts == [513 * 2 * m for m in range(4)]
    assert pair[1].span_starts == [513 * (2 * m + 1) for m in range(4)]
    for step in range(3):  # three steps of 8 micro-batches of 512 tokens
        segment, position = single.next_step()
        assert position == step * 8 * 513 and torch.equal(segment, everything[position:position + 8 * 513])
        for loader in pair:
            assert torch.equal(loader.next_step()[0], segment)


def test_token_stream_wraps_and_tracks_position():
    stream = tg.TokenStream([SAMPLE_TRAIN_SHARD], 1024)
    everything = tg.load_data_shard(SAMPLE_TRAIN_SHARD, 1024)
    stream.take(stream.total_tokens - 5)
    wrapped = stream.take(10)
    assert torch.equal(wrapped, torch.cat((everything[-5:], everything[:5])))
    assert stream.position == 5


# ----- evaluation windows -----

@pytest.mark.parametrize("first, end, seq_len, stride", [(1, 1000, 64, 64), (1, 1000, 64, 16), (1, 40, 64, 7),
                                                         (333, 1000, 64, 1), (500, 501, 32, 8), (1, 777, 50, 49)])
def test_window_schedule_scores_each_target_once_with_full_context(first, end, seq_len, stride):
    start, lo, hi = nm.window_schedule(first, end, seq_len, stride)
    assert lo[0] == first and hi[-1] == end and torch.equal(lo[1:], hi[:-1]) and bool((hi > lo).all())
    assert bool((hi - 1 - start <= seq_len).all())
    for s, a, b in zip(start.tolist(), lo.tolist(), hi.tolist()):
        for t in range(a, b):
            assert t - s >= min(t, seq_len - stride + 1)


def test_plain_eval_equals_direct_loss(sample_val_tokens):
    model = tiny_model().eval()
    tokens = sample_val_tokens[:4 * 64 + 1]
    setup = make_setup(model, tokens, seq_len=64, stride=64)
    result = tg.eval_val(setup)
    val_loss, val_bpb = result.val_loss, result.val_bpb
    with torch.no_grad():
        loss, _, _ = model(tokens[:-1].reshape(4, 64), tokens[1:].reshape(4, 64))
    n_bytes = nm.count_target_bytes(tokens[:-1], tokens[1:], setup.byte_tables).sum().item()
    assert val_loss == pytest.approx(loss.item(), abs=1e-5)
    assert val_bpb == pytest.approx(loss.item() * 256 / math.log(2) / n_bytes, abs=1e-5)


def test_sliding_eval_scores_each_target_from_its_window(sample_val_tokens):
    model = tiny_model().eval()
    tokens, seq_len, stride = sample_val_tokens[:301], 64, 16
    setup = make_setup(model, tokens, seq_len, stride)
    record = tg.TargetRecord(300, 0, tokens.device)
    record.nll.fill_(float("nan"))
    with torch.inference_mode():
        sums = nm.score_span(setup, 1, 301, record=record)
    per_target = record.nll
    assert int(sums[3]) == 300 and not per_target.isnan().any()
    start, lo, hi = nm.window_schedule(1, 301, seq_len, stride)
    with torch.no_grad():
        for s, a, b in zip(start.tolist(), lo.tolist(), hi.tolist()):
            for t in (a, b - 1):
                logits = model.logits(model.hidden(tokens[None, s:t]))[0, -1]
                expected = -logits.log_softmax(-1)[tokens[t]].item()
                assert per_target[t - 1].item() == pytest.approx(expected, abs=1e-4)
    assert sums[0].item() == pytest.approx(per_target.sum().item(), rel=1e-9)


# ----- quantization + compression -----

@pytest.mark.parametrize("bits", [8, 6])
def test_quantization_round_trip_is_deterministic_and_bounded(tmp_path, bits):
    model = tiny_model(num_experts=6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    state = model.state_dict()
    blob = tg.quantize_state_dict(state, bits)
    first, second = tg.compress_artifact(blob), tg.compress_artifact(tg.quantize_state_dict(state, bits))
    assert first == second
    path = tmp_path / "model.ptz"
    path.write_bytes(first)
    restored = tg.dequantize_state_dict(tg.load_artifact(path))
    assert restored.keys() == state.keys()
    qmax = 2 ** (bits - 1) - 1
    for name, tensor in state.items():
        if name in blob["quantized"]:
            row_bound = blob["scales"][name].float()[:, None] / 2 + 1e-7
            assert bool(((restored[name] - tensor).abs() <= row_bound).all())
            assert int(blob["quantized"][name].abs().max()) <= qmax
        else:
            assert torch.allclose(restored[name], tensor, rtol=1e-3, atol=1e-4)
    fresh = tiny_model(num_experts=6, seed=1)
    fresh.load_state_dict(restored)


def test_artifact_loader_rejects_garbage(tmp_path):
    path = tmp_path / "bad.ptz"
    path.write_bytes(b"not zstd at all")
    with pytest.raises(ValueError, match="not a b'PGA1' artifact"):
        tg.load_artifact(path)
    blob = tg.quantize_state_dict(tiny_model().state_dict(), 8)
    blob["__format__"] = "int4_magic_v9"
    path.write_bytes(tg.compress_artifact(blob))
    with pytest.raises(ValueError, match="unknown artifact format"):
        tg.load_artifact(path)
    assert tg.ARTIFACT_CAP_BYTES == 16_000_000


# ----- whole runs (subprocesses) -----

def test_end_to_end_run_logs_scores_and_artifact_reloads(tmp_path):
    proc, log = run_trainer(tmp_path, RUN_ID="e2e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("step:4/4 train_loss:", "step:4/4 val_loss:", "ngram_prefill tokens:50000",
                   "Serialized model int8_zstd:", "Code size:", "Total submission size int8_zstd:",
                   "final_int8_zstd_roundtrip_exact val_loss:", "legality_audit positions:",
                   "scored_tokens:4095 ", "eval_time roundtrip:", "final_ngram_ttt_exact val_loss:",
                   "peak memory", "===== ngram_mixer.py ====="):
        assert needle in log, needle
    artifact = tmp_path / "final_model.e2e.ptz"
    size_line = next(ln for ln in log.splitlines() if ln.startswith("Serialized model"))
    assert int(size_line.split(":")[1].split()[0]) == artifact.stat().st_size
    audit = log_fields(log, "legality_audit")
    assert audit["positions"] > 0 and audit["max_abs_sum_err"] < 1e-6
    assert audit["max_gold_logp_err"] < 1e-6 and audit["max_rescore_logp_delta"] == 0
    # Re-scoring the written artifact in a fresh process gives the same numbers, digit for digit.
    proc2, log2 = run_trainer(tmp_path, RUN_ID="e2e-reload", EVAL_ARTIFACT=str(artifact))
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    for prefix in ("final_int8_zstd_roundtrip_exact", "final_ngram_ttt_exact"):
        assert [ln for ln in log.splitlines() if ln.startswith(prefix)] == \
            [ln for ln in log2.splitlines() if ln.startswith(prefix)]


@pytest.mark.parametrize("stride, rank, world_size, prefill", [(1, 0, 1, 50000), (3, 0, 1, 50000), (5, 1, 2, 50000),
                                                               (5, 1, 2, 0)])
def test_mixture_loss_reads_the_targets_its_lookup_scored(monkeypatch, stride, rank, world_size, prefill):
    """NGRAM_TRAIN_STRIDE: the step's one lookup (build_trainer's lookup_positions) and the rows the mixture loss
    reads (GPT.mixture_rows) name the same targets, every stride-th of each micro-batch, in micro-batch order,
    inside the prefill (the table-mask form) and past it (chunk_start 0)."""
    for name, value in dict(TINY_ENV, NGRAM="1", NGRAM_MAX_ORDER="3", NGRAM_TRAIN_STRIDE=str(stride),
                            NGRAM_PREFILL_TOKENS=str(prefill)).items():
        monkeypatch.setenv(name, value)
    args = tg.Hyperparameters()
    run = SimpleNamespace(args=args, device=torch.device("cpu"), rank=rank, world_size=world_size, distributed=False,
                          compile_model=False, bos_id=1, autocast=contextlib.nullcontext)
    trainer = tg.build_trainer(run, tg.list_shards(args.data_path, "train"))
    segment, _ = trainer.loader.next_step()
    local_tokens = trainer.loader.span - 1
    lookups = trainer.lookup_positions.chunk(len(trainer.loader.span_starts))
    assert len(lookups) == 8 // world_size
    for start, looked_up in zip(trainer.loader.span_starts, lookups):
        targets = segment[start + 1:start + 1 + local_tokens]
        assert len(looked_up) == local_tokens // stride
        assert torch.equal(segment[looked_up], targets[trainer.base_model.mixture_rows])
    # a step runs on the subset: finite losses, and the mixture's NLL is not the neural CE's
    loss, ce, mix_nll = tg.train_step(run, trainer).tolist()
    assert all(math.isfinite(v) for v in (loss, ce, mix_nll)) and mix_nll < ce
    assert loss == pytest.approx(ce + args.ngram_loss_weight * mix_nll, rel=1e-5)


@pytest.mark.parametrize("prefill, masked", [(3000, 3), (0, 0)])
def test_lookup_past_the_prefill_counts_as_with_the_table_mask(monkeypatch, prefill, masked):
    """next_batch counts a segment the tables hold none of from chunk_start 0 (no leave-future-out work); its
    expert inputs must equal the table-mask form's, and segments that reach into the prefill (or wrap past the
    stream's end back into it) keep the mask."""
    for name, value in dict(TINY_ENV, NGRAM="1", NGRAM_MAX_ORDER="4", NGRAM_PREFILL_TOKENS=str(prefill)).items():
        monkeypatch.setenv(name, value)
    args = tg.Hyperparameters()
    tg.validate_hyperparameters(args, 1)
    run = SimpleNamespace(args=args, device=torch.device("cpu"), rank=0, world_size=1, distributed=False,
                          compile_model=False, bos_id=1, autocast=contextlib.nullcontext)
    trainer = tg.build_trainer(run, tg.list_shards(args.data_path, "train"))
    masks, honest_mask = [], tg.ngram_mixer.table_mask
    # next_batch's lookup (ngram_mixer.training_expert_inputs) calls the mixer's table_mask
    monkeypatch.setattr(tg.ngram_mixer, "table_mask", lambda *a: masks.append(a) or honest_mask(*a))
    stream = trainer.loader.stream
    for step in range(4):  # segments of 2,056 tokens: inside, across and past the 3,000-token prefill, then wrapping
        if step == 3:
            stream.take(stream.total_tokens - stream.position - 1000)
        position = stream.position
        segment, got = tg.next_batch(run, trainer)
        index = torch.arange(position, position + len(segment)) % stream.total_tokens
        in_table = honest_mask(trainer.tables.orders, index, trainer.prefill_tokens)
        expect = nm.expert_inputs(trainer.tables, segment, trainer.lookup_positions, args.ngram_min_count,
                                  in_table=in_table, discount=args.ngram_discount,
                                  document=args.document_cache(run.bos_id))
        assert all(torch.equal(a, b) for a, b in zip(got, expect))
    assert len(masks) == masked  # the third segment, past the prefill, was counted without the mask
    args.ngram_prefill_tokens = -1
    with pytest.raises(ValueError, match="NGRAM_PREFILL_TOKENS=-1"):
        tg.validate_hyperparameters(args, 1)


def test_lookup_is_the_same_for_one_and_two_processes(monkeypatch):
    """Every rank counts the whole segment before each of its targets, so rank 1 of 2 gets what one process gets
    for the targets of spans 1, 3, 5 and 7, inside the prefill and past it."""
    for prefill in (50000, 0):
        for name, value in dict(TINY_ENV, NGRAM="1", NGRAM_MAX_ORDER="4", NGRAM_PREFILL_TOKENS=str(prefill)).items():
            monkeypatch.setenv(name, value)
        got = []
        for rank, world_size in ((0, 1), (1, 2)):
            args = tg.Hyperparameters()
            run = SimpleNamespace(args=args, device=torch.device("cpu"), rank=rank, world_size=world_size,
                                  distributed=False, compile_model=False, bos_id=1, autocast=contextlib.nullcontext)
            got.append(tg.next_batch(run, tg.build_trainer(run, tg.list_shards(args.data_path, "train")))[1])
        for one, second, dim in zip(*got, (1, 1, 0)):
            assert torch.equal(torch.cat(one.chunk(8, dim)[1::2], dim), second), prefill


def test_two_processes_match_one_process(tmp_path):
    settings = dict(NGRAM="1", TTT="0", ITERATIONS="3")
    one, log1 = run_trainer(tmp_path, RUN_ID="one", **settings)
    two, log2 = run_trainer(tmp_path, nproc=2, RUN_ID="two", **settings)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world_size:2 grad_accum_steps:4" in log2
    for step in (1, 2, 3):
        for key in ("train_loss", "mix_nll"):
            assert log_value(log1, f"step:{step}/3 train", key) == pytest.approx(
                log_value(log2, f"step:{step}/3 train", key), abs=2e-4)
    assert log_value(log1, "final_ngram_ttt_exact", "val_loss") == pytest.approx(
        log_value(log2, "final_ngram_ttt_exact", "val_loss"), abs=1e-4)
    assert log_value(log1, "scored_tokens", "scored_bytes") == log_value(log2, "scored_tokens", "scored_bytes")


def test_warmup_steps_leave_the_run_as_without_them(tmp_path):
    """Warm-up restores the weights, the optimizers and the data stream, and drops the lookup it prepared from
    the warm-up stream (LookupPrefetch.reset): the logged losses equal a run without warm-up, digit for digit."""
    settings = dict(NGRAM="1", TTT="0", ITERATIONS="4", VAL_LOSS_EVERY="2")
    runs = [run_trainer(tmp_path, RUN_ID=f"warmup{n}", WARMUP_STEPS=str(n), **settings) for n in (0, 2)]
    for proc, _ in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    without, with_warmup = ([re.sub(r"(train_time|step_avg|eval_time):\S+", "", ln) for ln in log.splitlines()
                             if ln.startswith(("step:", "final_"))] for _, log in runs)
    assert len(without) >= 7 and without == with_warmup


def test_lookup_prefetch_returns_what_make_gives_once():
    calls = []

    def make():
        calls.append(len(calls))
        return torch.tensor([len(calls)]), (torch.zeros(2), ())

    prefetch = tg.LookupPrefetch(torch.device("cpu"))
    first = prefetch.take(make)  # nothing prepared: made now
    prefetch.ahead(make)
    second = prefetch.take(make)  # the prepared one, not a new call
    prefetch.ahead(make)
    prefetch.reset()
    third = prefetch.take(make)  # dropped, so made again
    assert [int(v[0]) for v in (first, second, third)] == [1, 2, 4] and len(calls) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lookup_prefetch_on_a_side_stream_matches_inline():
    """On CUDA the prepared lookup runs on a side stream while the default stream is busy; its values must equal
    the same lookup made inline."""
    device = torch.device("cuda")
    tokens = tg.load_data_shard(SAMPLE_VAL_SHARD, 1024).long()[:200_000].to(device)
    tables = tg.NgramTables(1024, (1, 2, 3, 4, 5, 6, 7), device=device)
    tables.extend(tokens)  # the tables hold the segment: leave-future-out
    positions = torch.arange(150_001, 190_000, 16, device=device)
    in_table = nm.table_mask(tables.orders, torch.arange(150_000, 200_000, device=device), 200_000)
    segment = tokens[150_000:]

    def make():
        return nm.expert_inputs(tables, segment, positions - 150_000, 1, in_table=in_table, discount=0.87)

    expect = make()
    prefetch = tg.LookupPrefetch(device)
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(3):
        for _ in range(20):  # keep the default stream busy while the side stream works
            busy = torch.tanh(busy @ busy)
        prefetch.ahead(make)
        got = prefetch.take(make)
        for a, b in zip(got, expect):
            assert torch.equal(a, b)


def test_wallclock_cap_stops_training(tmp_path):
    proc, log = run_trainer(tmp_path, RUN_ID="cap", ITERATIONS="100000", MAX_WALLCLOCK_SECONDS="3", NGRAM="0",
                            TTT="0", TRAIN_LOG_EVERY="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopping_early: wallclock_cap" in log
    steps = int(next(ln for ln in log.splitlines() if ln.startswith("stopping_early")).split("step:")[1].split("/")[0])
    assert 0 < steps < 100000


@pytest.mark.parametrize("overrides, message", [
    (dict(TOKENIZER_PATH="/nonexistent/sp.model"), "tokenizer not found: TOKENIZER_PATH=/nonexistent/sp.model"),
    (dict(VOCAB_SIZE="2048"), "VOCAB_SIZE=2048"),
    (dict(TRAIN_BATCH_TOKENS="1000"), "TRAIN_BATCH_TOKENS=1000"),
    (dict(SCALAR_LR="inf", TIED_EMBED_LR="inf", NGRAM="0"), "non-finite train loss"),
])
def test_bad_settings_exit_nonzero_with_a_clear_message(tmp_path, overrides, message):
    proc, _ = run_trainer(tmp_path, RUN_ID="bad", **overrides)
    assert proc.returncode != 0 and message in proc.stderr


def test_bad_shard_and_reused_run_id_exit_nonzero(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(SAMPLE_TRAIN_SHARD, data)
    write_shard(data / "fineweb_val_000000.bin", [tg.SHARD_MAGIC, tg.SHARD_VERSION, 99] + [0] * 253, range(10))
    proc, _ = run_trainer(tmp_path, RUN_ID="badshard", DATA_PATH=str(data))
    assert proc.returncode != 0 and "header says 99 tokens" in proc.stderr
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "taken.txt").write_text("an earlier run\n")
    proc, _ = run_trainer(tmp_path, RUN_ID="taken")
    assert proc.returncode != 0 and "logs/taken.txt exists: set another RUN_ID" in proc.stderr
    proc, _ = run_trainer(tmp_path, RUN_ID="taken", EVAL_ARTIFACT=str(tmp_path / "any.ptz"))
    assert proc.returncode != 0 and "logs/taken.txt exists: set another RUN_ID" in proc.stderr
    assert (tmp_path / "logs" / "taken.txt").read_text() == "an earlier run\n"


def test_train_gpt_stays_under_the_line_cap():
    assert len((REPO_ROOT / "train_gpt.py").read_text().splitlines()) <= 1500


def test_tiny_env_names_real_hyperparameters():
    # A typo in a test's env var would silently fall back to a default: every name must be a knob.
    assert {name.lower() for name in TINY_ENV} <= set(vars(tg.Hyperparameters()))
