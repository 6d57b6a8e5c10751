"""Tests for the stronger experts of ngram_mixer.py: within-chunk counts (NgramTables.counts) against a
brute-force Python reference, the two forms of the causal audit (candidate enumeration, future perturbation),
smoothed distributions summing to 1, leave-one-out, features, and the Triton kernel's distinct counts (CPU).

    python -m pytest -q tests/test_experts.py
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import ngram_mixer as nm  # noqa: E402
from ngram_mixer import ExpertCounts, NgramTables, expert_features, smoothed_probs  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# order 1 (unigram), packed orders, and for V = 1024 hashed ones (7 and beyond)
ORDERS = (1, 2, 3, 5, 7, 9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["dropped", "neutral"])
def masked_entries(request, monkeypatch):
    """Both ways of leaving out masked events, which must count alike: dropped (the CPU's way) and kept as neutral
    entries (the CUDA way, which avoids device syncs; ngram_mixer._drops_masked)."""
    if request.param == "neutral":
        monkeypatch.setattr(nm, "_drops_masked", lambda device: False)
    return request.param


def repetitive_stream(vocab_size, length, seed):
    """Random tokens with copied spans, so long contexts recur inside one chunk and across chunks."""
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, vocab_size, (length,), generator=gen)
    for _ in range(length // 100):
        src, dst = torch.randint(0, length - 40, (2,), generator=gen).tolist()
        if dst > src:
            stream[dst:dst + 30] = stream[src:src + 30].clone()
    return stream


def reference_counts(stream, t, target, n, upto=None):
    """(context, pair, distinct) of the n-grams ending at q < upto (default t) in the list `stream`, for the
    context before t."""
    if t < n - 1:
        return 0, 0, 0
    context, pair, followers = 0, 0, set()
    want = tuple(stream[t - n + 1:t])
    for q in range(n - 1, t if upto is None else upto):
        if tuple(stream[q - n + 1:q]) == want:
            context += 1
            pair += stream[q] == target
            followers.add(stream[q])
    return context, pair, len(followers)


def as_tuples(counts, k, p):
    return int(counts.context[k, p]), int(counts.pair[k, p]), int(counts.distinct[k, p])


@pytest.mark.parametrize("vocab_size,cached", [(5, 0), (5, 700), (1024, 1500)])
def test_counts_see_the_cache_and_the_chunks_earlier_tokens_only(sample_val_tokens, vocab_size, cached, masked_entries):
    stream = repetitive_stream(vocab_size, 2400, seed=vocab_size) if vocab_size < 1024 else sample_val_tokens[:2400]
    tables = NgramTables(vocab_size, ORDERS)
    tables.extend(stream[:cached])
    positions = torch.arange(cached, stream.numel(), 7)
    counts = tables.counts(stream, positions)
    as_list = stream.tolist()
    for p, t in enumerate(positions.tolist()):
        for k, n in enumerate(ORDERS):
            assert as_tuples(counts, k, p) == reference_counts(as_list, t, as_list[t], n), (t, n)
    assert (counts.context[-1] > 0).any() and (counts.distinct <= counts.context).all()


def test_chunked_counts_equal_one_whole_stream_call(sample_val_tokens, masked_entries):
    stream = sample_val_tokens[:30_000]
    whole = NgramTables(1024, ORDERS).counts(stream, torch.arange(1, stream.numel()), chunk_start=0)
    tables, parts = NgramTables(1024, ORDERS), []
    bounds = [1, 2, 9, 1000, 1003, 12_000, 30_000]
    for first, end in zip(bounds[:-1], bounds[1:]):
        parts.append(tables.counts(stream, torch.arange(first, end)))
        tables.extend(stream[tables.num_tokens:end])
    for field in ("context", "pair", "distinct"):
        assert torch.equal(getattr(whole, field), torch.cat([getattr(p, field) for p in parts], dim=1)), field
    # with chunk_start past every target only the table is read: fewer counts than every earlier token
    table_only = tables.counts(stream, torch.arange(20_000, 21_000), chunk_start=stream.numel())
    assert torch.equal(table_only.context, tables.counts(stream[:21_000], torch.arange(20_000, 21_000)).context)


@pytest.mark.parametrize("method", ["absolute", "witten_bell"])
def test_candidate_enumeration_sums_to_one_and_matches_the_score(sample_val_tokens, method):
    stream, vocab = sample_val_tokens[:9000], 1024
    tables = NgramTables(vocab, ORDERS)
    tables.extend(stream[:6000])
    for t in (6000, 6001, 7777, 8999):
        # the audit's form: the stream ends right before t, targets are every token
        cand = tables.counts(stream[:t], torch.full((vocab,), t), targets=torch.arange(vocab))
        dist = smoothed_probs(cand, vocab, 0.8, method)
        assert ((dist.sum(dim=1) - 1).abs() <= 1e-12).all() and (dist > 0).all()
        scored = smoothed_probs(tables.counts(stream, torch.tensor([t])), vocab, 0.8, method)[:, 0]
        assert torch.allclose(dist[:, stream[t]], scored, rtol=0, atol=1e-15)
        assert (cand.distinct[:, 0] == (cand.pair > 0).sum(dim=1)).all()
        assert (cand.context[:, 0] == cand.pair.sum(dim=1)).all()


def test_future_perturbation_changes_nothing(sample_val_tokens):
    stream = sample_val_tokens[:12_000]
    tables = NgramTables(1024, ORDERS)
    tables.extend(stream[:8000])
    gen = torch.Generator().manual_seed(3)
    for t in (8000, 8500, 11_000):
        perturbed = stream.clone()
        perturbed[t + 1:] = torch.randint(0, 1024, (stream.numel() - t - 1,), generator=gen)
        # positions after t pull the perturbed tokens into the chunk's events; the score at t must not see them
        positions = torch.tensor([t, stream.numel() - 1])
        a, b = tables.counts(stream, positions), tables.counts(perturbed, positions)
        for field in ("context", "pair", "distinct"):
            assert torch.equal(getattr(a, field)[:, 0], getattr(b, field)[:, 0]), (t, field)
        assert not torch.equal(a.pair[:, 1], b.pair[:, 1]) or not torch.equal(a.context[:, 1], b.context[:, 1])


@pytest.mark.parametrize("held", [(0, 800), (0, 500), (300, 800)])
def test_training_view_is_the_table_without_later_ngrams_plus_earlier_ones(held, masked_entries):
    # the table holds stream[held[0]:held[1]] (the training stream's prefilled part); positions inside it see the
    # table minus the n-grams at or after t, positions outside see the table plus the stream's earlier n-grams
    stream = repetitive_stream(4, 800, seed=9)
    tables = NgramTables(4, ORDERS)
    for piece in torch.split(stream[held[0]:held[1]], [3, 97, held[1] - held[0] - 100]):
        tables.extend(piece)
    order_col = torch.tensor(ORDERS)[:, None]
    q = torch.arange(stream.numel())
    in_table = (q >= held[0] + order_col - 1) & (q < held[1])
    positions = torch.tensor([0, 3, 200, 301, 310, 555, 799])
    got = tables.counts(stream, positions, in_table=in_table)
    as_list = stream.tolist()
    for p, t in enumerate(positions.tolist()):
        for k, n in enumerate(ORDERS):
            # every n-gram of the table is one of the stream's own, so the view is the stream's n-grams before t
            assert as_tuples(got, k, p) == reference_counts(as_list, t, as_list[t], n), (held, t, n)
    with pytest.raises(ValueError, match="not in the table"):
        NgramTables(4, ORDERS).counts(stream, positions, in_table=in_table)
    with pytest.raises(ValueError, match="in_table must be bool"):
        tables.counts(stream, positions, in_table=in_table[:, :10])


def test_training_view_past_the_prefill_is_the_table_plus_earlier_ngrams(masked_entries):
    # nothing of this stream is in the table (training past the prefill): the counts stop at the last target
    stream = repetitive_stream(4, 800, seed=9)
    tables = NgramTables(4, ORDERS)
    tables.extend(repetitive_stream(4, 500, seed=10))
    in_table = torch.zeros(len(ORDERS), stream.numel(), dtype=torch.bool)
    positions = torch.tensor([0, 3, 200, 301, 310, 555])
    got = tables.counts(stream, positions, in_table=in_table)
    # a query at the stream's end makes the call read every n-gram: the first queries' counts must not change
    read_all = tables.counts(stream, torch.cat([positions, torch.tensor([799])]), in_table=in_table)
    # which is the evaluation form counted from chunk_start 0 (train_gpt.next_batch past the prefill)
    from_zero = tables.counts(stream, positions, chunk_start=0)
    for field in ("context", "pair", "distinct"):
        assert torch.equal(getattr(got, field), getattr(read_all, field)[:, :-1]), field
        assert torch.equal(getattr(got, field), getattr(from_zero, field)), field
    table_context, table_pair = tables.lookup(stream, positions)
    as_list = stream.tolist()
    for p, t in enumerate(positions.tolist()):
        for k, n in enumerate(ORDERS):
            context, pair, _ = reference_counts(as_list, t, as_list[t], n)
            assert (int(got.context[k, p]), int(got.pair[k, p])) == (int(table_context[k, p]) + context,
                                                                     int(table_pair[k, p]) + pair), (t, n)


def test_smoothed_rows_back_off_and_reject_bad_settings():
    counts = ExpertCounts(torch.tensor([[10], [0], [4]]), torch.tensor([[3], [0], [4]]), torch.tensor([[5], [0], [1]]))
    probs = smoothed_probs(counts, 16, 0.5)
    first = (3 - 0.5 + 0.5 * 5 / 16) / 10
    assert torch.allclose(probs[:, 0], torch.tensor([first, first, (4 - 0.5 + 0.5 * first) / 4], dtype=torch.float64))
    wb = smoothed_probs(counts, 16, method="witten_bell")
    assert torch.isclose(wb[0, 0], torch.tensor((3 + 5 / 16) / 15, dtype=torch.float64))
    for kwargs in (dict(discounts=0.0), dict(discounts=1.5), dict(discounts=(0.5, 0.5)), dict(method="kn")):
        with pytest.raises(ValueError):
            smoothed_probs(counts, 16, **kwargs)
    tables = NgramTables(16, (1, 2))
    with pytest.raises(ValueError, match="targets has shape"):
        tables.counts(torch.arange(5), torch.tensor([5, 5]), targets=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"positions\[0\] = 5"):
        tables.counts(torch.arange(5), torch.tensor([5]))


def test_features_are_log_counts_and_the_longest_seen_order():
    counts = ExpertCounts(torch.tensor([[7, 0], [3, 0], [0, 0]]), torch.zeros(3, 2, dtype=torch.int64),
                          torch.tensor([[4, 0], [2, 0], [0, 0]]))
    feats = expert_features(counts, (1, 2, 4))
    assert feats.shape == (2, 7) and feats.dtype == torch.float32
    assert torch.allclose(feats[0, :6], torch.log1p(torch.tensor([7.0, 3, 0, 4, 2, 0])))
    assert feats[0, 6] == 0.5 and feats[1].abs().sum() == 0


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or CUDA")
def test_triton_counts_match_torch(sample_val_tokens):
    device = "cpu" if INTERPRETED else "cuda"
    stream = sample_val_tokens[:1500].to(device)
    tables = NgramTables(1024, ORDERS, device=device, backend="triton")
    tables.extend(stream[:1000])
    positions = torch.arange(1, 1500, device=device)
    got = tables.counts(stream, positions)
    tables.backend = "torch"
    expect = tables.counts(stream, positions)
    for field in ("context", "pair", "distinct"):
        assert torch.equal(getattr(got, field), getattr(expect, field)), field
    assert expect.distinct.sum() > 0


def test_triton_counts_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_triton_counts_match_torch"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


# ----- the document cache -----

def reference_window(stream, t, bos_id, horizon):
    """lo: the last bos_id in stream[t-horizon:t], else max(t - horizon, 0)."""
    for q in range(t - 1, max(t - horizon, 0) - 1, -1):
        if stream[q] == bos_id:
            return q
    return max(t - horizon, 0)


@pytest.mark.parametrize("horizon", [1, 7, 40, 8192])
def test_document_counts_are_those_of_the_window_before_t(horizon, masked_entries):
    # a small vocabulary with id 0 as BOS opening documents of 1 to 150 tokens, repeats inside them
    stream = repetitive_stream(5, 600, seed=horizon) + 1
    stream[[0, 90, 91, 240, 390, 550]] = 0
    document = nm.DocumentCache(6, bos_id=0, max_order=3, horizon=horizon)
    positions = torch.arange(1, stream.numel())
    context, pair = document.counts(stream, positions, stream[positions])
    starts = document.window_starts(stream, positions)
    as_list = stream.tolist()
    for p, t in enumerate(positions.tolist()):
        lo = reference_window(as_list, t, 0, horizon)
        assert int(starts[p]) == lo
        for k, n in enumerate(document.orders):
            # the n-grams inside stream[lo:t]: reference_counts over the window alone, context fitted inside it
            expected = reference_counts(as_list[lo:t + 1], t - lo, as_list[t], n)[:2]
            assert (int(context[k, p]), int(pair[k, p])) == expected, (t, n, lo)
    assert (context[0] > 0).all() and ((context[-1] > 0).any() or horizon < 3)


def test_document_expert_sums_to_one_and_never_reads_t_or_later(sample_val_tokens):
    stream, vocab = sample_val_tokens[:3000], 1024
    document = nm.DocumentCache(vocab, bos_id=1, max_order=4, prior=0.5)
    base = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    # 523: the second document starts here (BOS at 523), so 524 sees a one-token window
    for t in (1, 2, 523, 524, 600, 2999):
        # the audit's form: the stream ends right before t, every token a candidate
        dist = document.probs(*document.counts(stream[:t], torch.full((vocab,), t), torch.arange(vocab)), base)
        assert abs(float(dist.sum()) - 1) < 1e-12 and (dist > 0).all()
        perturbed = stream.clone()
        perturbed[t:] = torch.randint(0, vocab, (stream.numel() - t,), generator=gen)
        # t's candidates from the stream cut at t equal what the full (and a perturbed) stream gives at t
        for full in (stream, perturbed):
            scored = document.probs(*document.counts(full, torch.tensor([t]), stream[t:t + 1]), base[:1])
            assert torch.allclose(dist[stream[t]], scored[0], rtol=0, atol=1e-15)


def test_document_expert_joins_the_table_experts_last(sample_val_tokens):
    stream = sample_val_tokens[:5000]
    tables = NgramTables(1024, (1, 2, 3))
    tables.extend(stream[:3000])
    positions = torch.arange(3000, 5000)
    document = nm.DocumentCache(1024, bos_id=1, max_order=2)
    probs, valid, features = nm.expert_inputs(tables, stream, positions, 1, discount=0.8, document=document)
    plain = nm.expert_inputs(tables, stream, positions, 1, discount=0.8)
    assert probs.shape == (3, 2000) and valid.shape == (3, 2000)
    assert features.shape == (2000, nm.expert_feature_count(2, 2))
    assert torch.equal(probs[:2], plain[0]) and torch.equal(features[:, :5], plain[2])
    # above the highest table order, sharper where the document repeats itself
    context, pair = document.counts(stream, positions, stream[positions])
    top = smoothed_probs(tables.counts(stream, positions), 1024, 0.8)[-1]
    assert torch.allclose(probs[2].double(), document.probs(context, pair, top), rtol=1e-6)
    assert torch.equal(features[:, 5:], torch.log1p(context.float()).T)
    repeats = pair[-1] > 0  # the target already followed this context in the document
    assert repeats.sum() > 100 and float(torch.log(probs[2] / probs[1])[repeats].mean()) > 0.5
    with pytest.raises(ValueError, match="DocumentCache needs"):
        nm.DocumentCache(1024, 1, max_order=0)


def test_row_dense_ids_are_equal_exactly_for_the_same_order_and_ngram():
    gen = torch.Generator().manual_seed(5)
    vocab = 7
    pair_keys = torch.randint(0, 4 * vocab, (3, 50), generator=gen)  # many repeats, and the same keys in every row
    pair_id, ctx_id = nm._row_dense_ids(pair_keys, vocab)
    row = torch.arange(3)[:, None].expand_as(pair_keys)
    same_row = row.reshape(-1, 1) == row.reshape(1, -1)
    for ids, keys in ((pair_id, pair_keys), (ctx_id, pair_keys // vocab)):
        same_key = keys.reshape(-1, 1) == keys.reshape(1, -1)
        assert torch.equal(ids.reshape(-1, 1) == ids.reshape(1, -1), same_row & same_key)
    for ids in (pair_id, ctx_id):  # dense: 0 .. (number of distinct ids) - 1, within the K * N bound
        assert torch.equal(torch.unique(ids), torch.arange(len(torch.unique(ids))))
