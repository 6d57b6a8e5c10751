"""Tests for ngram_mixer.py: exact counts against collections.Counter, normalization, leave-one-out, causality,
the mixture, the Triton lookup kernel against the torch path, and the PR #834 audit (CPU, under a minute).

    python -m pytest -q tests/test_ngram_mixer.py

The Triton kernel runs on CPU under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton
is imported, and must not leak into the other tests); on a CUDA machine it also runs natively.
"""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
import ngram_mixer as nm  # noqa: E402
from ngram_mixer import NgramTables, mixture_logprob, mixture_weights  # noqa: E402

sys.path.insert(0, str(REPO_ROOT / "bench"))
from pr834_tables import BucketedTables  # noqa: E402

ORDERS = (2, 3, 4, 5, 6, 7)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def counter_counts(table_tokens, stream, positions, orders):
    """Brute-force (context, pair) counts [K, P] int64 of table_tokens' n-grams at stream[positions]."""
    table, query = table_tokens.tolist(), stream.tolist()
    ctx, pair = torch.zeros(2, len(orders), len(positions), dtype=torch.int64)
    for k, n in enumerate(orders):
        grams = [tuple(table[i:i + n]) for i in range(len(table) - n + 1)]
        pairs, contexts = collections.Counter(grams), collections.Counter(g[:-1] for g in grams)
        for p, t in enumerate(positions.tolist()):
            if t >= n - 1:
                ctx[k, p] = contexts[tuple(query[t - n + 1:t])]
                pair[k, p] = pairs[tuple(query[t - n + 1:t + 1])]
    return ctx, pair


def phrase_stream(vocab_size, length, seed):
    """Tokens over the whole vocabulary with repeated phrases, so long contexts recur with varied successors."""
    gen = torch.Generator().manual_seed(seed)
    phrases = torch.randint(0, vocab_size, (64, 12), generator=gen)
    stream = phrases[torch.randint(0, 64, (length // 12 + 1,), generator=gen)].flatten()[:length]
    noise = torch.rand(length, generator=gen) < 0.15
    return torch.where(noise, torch.randint(0, vocab_size, (length,), generator=gen), stream)


def random_chunks(total, seed):
    """Chunk sizes 1..5000 summing to total, many tiny ones so chunk boundaries fall inside n-grams."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.integers(1, 9) if rng.random() < 0.5 else rng.integers(1, 5001)))
    sizes[-1] -= sum(sizes) - total
    return [s for s in sizes if s > 0]


def python_context_key(newest_first, vocab_size):
    """The module's documented key rule in plain Python ints: ids newest first, exact or splitmix64 words."""
    bits = (vocab_size - 1).bit_length()
    per_word, full = 63 // bits, (1 << 64) - 1
    if len(newest_first) < per_word:
        return sum(c * vocab_size**i for i, c in enumerate(newest_first))
    chain = 0
    for w in range(0, len(newest_first), per_word):
        word = sum(c * vocab_size**i for i, c in enumerate(newest_first[w:w + per_word]))
        x = (chain + word + 0x9E3779B97F4A7C15) & full
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & full
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & full
        chain = x ^ (x >> 31)
    return chain & ((1 << (63 - bits)) - 1)


def test_counts_match_counter_on_sample(sample_val_tokens):
    tokens = sample_val_tokens[:50_000]
    tables = NgramTables(1024, ORDERS)
    tables.extend(tokens)
    positions = torch.arange(tokens.numel())
    ctx, pair = tables.lookup(tokens, positions)
    ref_ctx, ref_pair = counter_counts(tokens, tokens, positions, ORDERS)
    assert torch.equal(ctx, ref_ctx) and torch.equal(pair, ref_pair)
    assert tables.hashed_orders == (7,) and tables.num_tokens == 50_000
    # a lookup stream other than the table's: misses must read 0
    other = sample_val_tokens[600_000:605_000]
    ctx, pair = tables.lookup(other, torch.arange(other.numel()))
    ref_ctx, ref_pair = counter_counts(tokens, other, torch.arange(other.numel()), ORDERS)
    assert torch.equal(ctx, ref_ctx) and torch.equal(pair, ref_pair) and (pair == 0).any()


@pytest.mark.parametrize("vocab_size", [1024, 8192])
def test_chunked_extends_give_identical_arrays(sample_val_tokens, vocab_size):
    tokens = sample_val_tokens[:50_000] if vocab_size == 1024 else phrase_stream(vocab_size, 50_000, seed=1)
    whole, chunked = NgramTables(vocab_size, ORDERS), NgramTables(vocab_size, ORDERS)
    whole.extend(tokens)
    for piece in torch.split(tokens, random_chunks(tokens.numel(), seed=vocab_size)):
        chunked.extend(piece)
    for name in ("keys", "cum", "key_offsets", "tail"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name)), name
    assert chunked.num_tokens == tokens.numel()
    pieces = NgramTables(vocab_size, ORDERS)
    pieces.extend(tokens, piece_tokens=4096)  # one call, cut into pieces inside (the trainer's prefill)
    assert all(torch.equal(getattr(whole, name), getattr(pieces, name)) for name in ("keys", "cum", "tail"))
    for n in ORDERS:
        keys, cum = whole.pair_keys[n], whole.cum_counts[n]
        assert keys.numel() > 0 and (keys[1:] > keys[:-1]).all() and cum[0] == 0 and (cum.diff() > 0).all()


@pytest.mark.parametrize("vocab_size,orders", [(1024, (2, 6, 7, 8, 13, 14)), (8192, (2, 4, 5, 6, 7, 9, 10))])
def test_context_keys_match_python_rule(vocab_size, orders):
    gen = torch.Generator().manual_seed(2)
    stream = torch.randint(0, vocab_size, (400,), generator=gen)
    stream[:20] = vocab_size - 1
    positions = torch.arange(orders[-1], stream.numel())
    columns = nm._columns(stream, positions, orders[-1])
    keys = torch.stack(list(nm._context_keys(columns, vocab_size, orders)))
    bits = (vocab_size - 1).bit_length()
    for k, n in enumerate(orders):
        expect = [python_context_key(stream[t - n + 1:t].flip(0).tolist(), vocab_size) for t in positions.tolist()]
        assert keys[k].tolist() == expect, f"order {n}"
        assert int(keys[k].min()) >= 0 and int(keys[k].max()) < 2 ** (63 - bits)
        assert (n in NgramTables(vocab_size, orders).hashed_orders) == (n * bits > 63)


@pytest.mark.parametrize("vocab_size", [1024, 8192])
def test_distribution_rows_sum_to_one(sample_val_tokens, vocab_size):
    tokens = sample_val_tokens[:100_000] if vocab_size == 1024 else phrase_stream(vocab_size, 100_000, seed=3)
    tables = NgramTables(vocab_size, ORDERS)
    tables.extend(tokens)
    assert tables.hashed_orders == ((7,) if vocab_size == 1024 else (5, 6, 7))
    gen = torch.Generator().manual_seed(4)
    positions = torch.randint(6, tokens.numel(), (1000,), generator=gen)
    ctx, pair = tables.lookup(tokens, positions)
    probs = pair.double() / ctx.double()
    for p, t in enumerate(positions.tolist()):
        dist = tables.distribution(tokens[:t])
        # every context here occurs in the table (it precedes tokens[t]), so every row is a distribution
        assert ((dist.sum(dim=1) - 1).abs() <= 1e-12).all(), (t, dist.sum(dim=1))
        assert torch.equal(dist[:, tokens[t]], probs[:, p])
    short = tables.distribution(tokens[:2])
    assert short[2:].abs().sum() == 0 and ((short[:2].sum(dim=1) - 1).abs() <= 1e-12).all()
    # id 3 is never followed by anything in this table, so no order has seen a context ending in it
    tables = NgramTables(vocab_size, ORDERS)
    assert tables.distribution(tokens[:10]).abs().sum() == 0
    tables.extend(torch.tensor([1, 2, 3]))
    assert tables.distribution(torch.full((6,), 3)).abs().sum() == 0
    assert tables.distribution(torch.tensor([2]))[0, 3] == 1


def test_leave_one_out_equals_table_without_the_occurrence():
    stream = torch.randint(0, 6, (600,), generator=torch.Generator().manual_seed(5))
    tables = NgramTables(6, ORDERS)
    tables.extend(stream)
    positions = torch.tensor([0, 1, 5, 77, 300, 599])
    ctx, pair = tables.lookup(stream, positions, exclude_self=True)
    for p, t in enumerate(positions.tolist()):
        for k, n in enumerate(ORDERS):
            if t < n - 1:
                assert ctx[k, p] == pair[k, p] == 0
                continue
            # the table's n-grams minus the one ending at t = those ending before t + those starting after t-n+1
            parts = [counter_counts(part, stream, positions[p:p + 1], (n,))
                     for part in (stream[:t], stream[t - n + 2:])]
            assert ctx[k, p] == parts[0][0] + parts[1][0] and pair[k, p] == parts[0][1] + parts[1][1], (n, t)
    plain = tables.lookup(stream, positions)
    mask = torch.rand(len(ORDERS), positions.numel(), generator=torch.Generator().manual_seed(6)) < 0.5
    for drop in (mask, mask[:, :1], mask[0]):
        got = tables.lookup(stream, positions, exclude_self=drop)
        full = drop.expand(len(ORDERS), positions.numel())
        for g, loo, base in zip(got, (ctx, pair), plain):
            assert torch.equal(g, torch.where(full, loo, base))
    with pytest.raises(ValueError, match="not in the table"):
        tables.lookup(torch.full((8,), 5), torch.tensor([7]), exclude_self=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        tables.lookup(stream, positions, exclude_self=torch.ones(3, dtype=torch.bool))


def test_scores_do_not_depend_on_later_tokens(sample_val_tokens):
    def chunked_scores(stream, chunk=1000):
        # eval order: score a chunk with the tables of earlier chunks, then extend by it
        tables, ctx, pair = NgramTables(1024, ORDERS), [], []
        for start in range(0, stream.numel(), chunk):
            c, p = tables.lookup(stream, torch.arange(start, min(start + chunk, stream.numel())))
            ctx.append(c)
            pair.append(p)
            tables.extend(stream[start:start + chunk])
        return torch.cat(ctx, dim=1), torch.cat(pair, dim=1)

    stream = sample_val_tokens[:20_000]
    changed = stream.clone()
    t0 = 12_345
    changed[t0:] = torch.randint(0, 1024, (changed.numel() - t0,), generator=torch.Generator().manual_seed(7))
    (c1, p1), (c2, p2) = chunked_scores(stream), chunked_scores(changed)
    assert torch.equal(c1[:, :t0 + 1], c2[:, :t0 + 1]) and torch.equal(p1[:, :t0], p2[:, :t0])
    assert not torch.equal(p1[:, t0:], p2[:, t0:])
    tables = NgramTables(1024, ORDERS)
    tables.extend(stream[:t0])
    other = NgramTables(1024, ORDERS)
    other.extend(changed[:t0])
    assert torch.equal(tables.distribution(stream[:t0]), other.distribution(changed[:t0]))


def mixture_case(seed, rows=24, n_experts=6, vocab=40):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 3
    dists = torch.softmax(torch.randn(n_experts, rows, vocab, generator=gen) * 3, dim=2)
    dists = dists * (torch.rand(n_experts, rows, vocab, generator=gen) < 0.6)
    dists[..., 0] += 1e-3
    dists = dists / dists.sum(dim=2, keepdim=True)
    valid = torch.rand(n_experts, rows, generator=gen) < 0.6
    valid[:, :3] = False
    valid[:, 3:6] = True
    # an invalid expert's numbers must be ignored, whatever they are
    dists[~valid] = float("nan")
    gate = torch.randn(rows, 1 + n_experts, generator=gen) * 4
    gate[6, 0] = -200.0
    return logits, dists, valid, gate


@pytest.mark.parametrize("floor", [0.0, 0.05, 0.5, 1.0])
def test_mixture_is_a_normalized_distribution(floor):
    logits, dists, valid, gate = mixture_case(seed=8)
    rows, vocab = logits.shape
    n_experts = dists.shape[0]
    weights = mixture_weights(gate, valid, floor)
    assert (weights[:, 0] >= floor * (1 - 1e-6)).all() and ((weights.sum(dim=1) - 1).abs() < 1e-6).all()
    assert (weights[:, 1:][~valid.T] == 0).all() and (weights[:3, 0] == 1).all()
    # score every candidate token as the target: P*V rows
    logprob = mixture_logprob(torch.log_softmax(logits, 1).flatten(), dists.reshape(n_experts, -1),
                              valid.repeat_interleave(vocab, 1), weights.repeat_interleave(vocab, 0))
    assert logprob.dtype == torch.float32
    total = logprob.double().exp().view(rows, vocab).sum(dim=1)
    assert (total - 1).abs().max() < 1e-5, total
    # the same distribution written out in float64: w0 * softmax + sum_k w_k * expert_k
    experts = torch.where(valid[..., None], dists.double(), 0.0)
    w = weights.double()
    reference = w[:, :1] * torch.softmax(logits.double(), 1) + torch.einsum("pk,kpv->pv", w[:, 1:], experts)
    assert torch.allclose(reference.flatten(), logprob.double().exp(), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_mixture_gradients_are_finite_and_flow(floor):
    logits, dists, valid, gate = mixture_case(seed=9)
    targets = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=torch.Generator().manual_seed(10))
    probs = dists.gather(2, targets[None, :, None].expand(dists.shape[0], -1, 1))[..., 0]
    assert ((probs == 0) & valid).any(), "the case must include valid experts giving the target 0"
    logits.requires_grad_(True)
    gate.requires_grad_(True)
    neural = torch.log_softmax(logits.bfloat16().float(), 1).gather(1, targets[:, None])[:, 0]
    loss = -mixture_logprob(neural, probs, valid, mixture_weights(gate, valid, floor)).sum()
    loss.backward()
    for grad in (logits.grad, gate.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # rows without a valid expert have w0 = 1 whatever the gate says
    assert (gate.grad[:3] == 0).all()


def test_mixture_rejects_bad_floor():
    logits, dists, valid, gate = mixture_case(seed=11)
    with pytest.raises(ValueError, match="neural_floor"):
        mixture_weights(gate, valid, 1.5)


def triton_cases(sample_val_tokens, device):
    """(tables, query stream) pairs: sample data, hashed V=8192, tiny vocab, partly empty and chunked tables."""
    cases = []
    sample_query = torch.cat([sample_val_tokens[:2500], sample_val_tokens[700_000:701_000]])
    for vocab, orders, table_tokens, query in [
        (1024, ORDERS, sample_val_tokens[:6000], sample_query),
        (8192, ORDERS, phrase_stream(8192, 6000, seed=12), phrase_stream(8192, 2000, seed=12)),
        (7, (2, 3, 5), torch.randint(0, 7, (800,), generator=torch.Generator().manual_seed(13)), None),
        (1024, ORDERS, sample_val_tokens[:3], sample_val_tokens[:50]),
    ]:
        tables = NgramTables(vocab, orders, device=device, backend="triton")
        for piece in torch.split(table_tokens, random_chunks(table_tokens.numel(), seed=vocab)):
            tables.extend(piece)
        cases.append((tables, (table_tokens if query is None else query).to(device)))
    return cases


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="needs TRITON_INTERPRET=1 or CUDA")
def test_triton_matches_torch(sample_val_tokens):
    device = "cpu" if INTERPRETED else "cuda"
    for tables, query in triton_cases(sample_val_tokens, device):
        positions = torch.arange(query.numel(), device=device)
        got = tables.lookup(query, positions)
        tables.backend = "torch"
        expect = tables.lookup(query, positions)
        assert all(torch.equal(g, e) for g, e in zip(got, expect)), tables.vocab_size
        assert expect[1].sum() > 0


def test_triton_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "test_triton_matches_torch"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_imports_and_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, ngram_mixer as nm\n"
            "assert nm.triton is None\n"
            "t = nm.NgramTables(16); assert t.backend == 'torch'\n"
            "s = torch.arange(40) % 5; t.extend(s); c, p = t.lookup(s, torch.arange(40)); assert int(p[0, 39]) == 8\n"
            "try:\n    nm.NgramTables(16, backend='triton')\nexcept RuntimeError:\n    pass\n"
            "else:\n    raise SystemExit('backend=triton without triton must raise')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_bucketed_scores_exceed_one_while_exact_tables_sum_to_one(sample_val_tokens):
    tokens, split = sample_val_tokens[:200_000], 150_000
    positions = torch.randint(split, tokens.numel(), (300,), generator=torch.Generator().manual_seed(14))
    tables = NgramTables(1024, ORDERS)
    tables.extend(tokens[:split])
    # every candidate next token after each position's context: 7-token windows, context then candidate
    windows = tokens[positions[:, None] + torch.arange(-6, 1)].repeat_interleave(1024, 0)
    windows[:, -1] = torch.arange(1024).repeat(positions.numel())
    ctx, pair = tables.lookup(windows.flatten(), torch.arange(6, windows.numel(), 7))
    ctx, pair = ctx.view(len(ORDERS), -1, 1024), pair.view(len(ORDERS), -1, 1024)
    assert (ctx == ctx[..., :1]).all() and torch.equal(pair.sum(dim=2), ctx[..., 0])
    bucketed = BucketedTables(1024, ORDERS)
    bucketed.extend(tokens[:split])
    scores = torch.stack([bucketed.distribution(tokens[t - 6:t]) for t in positions.tolist()], dim=1)  # [K, P, V]
    ctx, pair = bucketed.lookup(tokens, positions)
    gold = torch.where(ctx > 0, pair.double() / ctx.clamp(min=1), 0.0)
    # lookup's gold score is the score distribution() gives that token: the audit compares exactly these
    assert torch.allclose(gold, scores.gather(2, tokens[positions].expand(len(ORDERS), -1)[..., None])[..., 0])
    masses = {n: scores[k].sum(dim=1).mean().item() for k, n in enumerate(ORDERS)}
    assert (scores >= 0).all() and (gold <= 1).all()
    print("PR #834-style bucketed mass, mean over positions:", {n: round(m, 1) for n, m in masses.items()})
    assert min(masses.values()) > 1.5, masses


def test_bad_input_raises():
    for kwargs in (dict(vocab_size=1), dict(vocab_size=16, orders=(0, 2)), dict(vocab_size=16, orders=(1,)),
                   dict(vocab_size=16, orders=(3, 2)), dict(vocab_size=16, orders=(2, 2)),
                   dict(vocab_size=16, orders=()),
                   dict(vocab_size=16, orders=(2.0,)), dict(vocab_size=16, backend="cuda")):
        with pytest.raises(ValueError):
            NgramTables(**kwargs)
    tables = NgramTables(16, (2, 3))
    with pytest.raises(ValueError, match="integer dtype"):
        tables.extend(torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        tables.extend(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        tables.extend([1, 2])
    with pytest.raises(ValueError, match=r"tokens\[2\] = -1 "):
        tables.extend(torch.tensor([0, 5, -1]))
    with pytest.raises(ValueError, match=r"tokens\[0\] = 16 "):
        tables.extend(torch.tensor([16, 5]))
    assert tables.num_tokens == 0 and tables.keys.numel() == 0
    stream = torch.tensor([1, 2, 3, 1, 2])
    tables.extend(stream)
    before = (tables.keys.clone(), tables.cum.clone(), tables.nbytes())
    tables.extend(torch.zeros(0, dtype=torch.int64))
    assert torch.equal(tables.keys, before[0]) and torch.equal(tables.cum, before[1]) and tables.num_tokens == 5
    assert tables.nbytes() == before[2] == 8 * (2 * tables.keys.numel() + 2 + 3 + 2)
    with pytest.raises(ValueError, match=r"positions\[1\] = 5 is outside \[0, 5\)"):
        tables.lookup(stream, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"positions\[0\] = -1"):
        tables.lookup(stream, torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"stream\[4\] = 99"):
        tables.lookup(torch.tensor([1, 2, 3, 4, 99]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"context\[0\] = 17"):
        tables.distribution(torch.tensor([17]))
    ctx, pair = tables.lookup(stream, torch.zeros(0, dtype=torch.int64))
    assert ctx.shape == pair.shape == (2, 0)


@pytest.mark.parametrize("first_len", range(1, 8))
def test_chunked_extend_equals_one_extend_for_short_first_chunks(first_len):
    # a first extend shorter than max_order - 1 once kept its left padding as if it were tokens
    stream = torch.arange(5, 5 + 24) % 11
    one = NgramTables(16, ORDERS)
    one.extend(stream)
    chunked = NgramTables(16, ORDERS)
    chunked.extend(stream[:first_len])
    chunked.extend(stream[first_len:])
    assert torch.equal(one.keys, chunked.keys) and torch.equal(one.cum, chunked.cum)
    totals = [int(chunked.cum_counts[n][-1]) for n in ORDERS]
    assert totals == [len(stream) - n + 1 for n in ORDERS]
    assert torch.equal(chunked.tail, stream[-6:]) and chunked.num_tokens == len(stream)


def test_lookup_with_explicit_targets_counts_candidates_after_a_cut_stream(sample_val_tokens):
    tokens = sample_val_tokens[:3000]
    tables = NgramTables(1024, ORDERS)
    tables.extend(tokens[:2000])
    t = 2500
    ctx, pair = tables.lookup(tokens[:t], torch.full((1024,), t), targets=torch.arange(1024))
    gold_ctx, gold_pair = tables.lookup(tokens, torch.tensor([t]))
    # the stream ends before t, yet every candidate sees t's context, and the gold one matches the plain lookup
    assert (ctx == gold_ctx).all() and torch.equal(pair[:, tokens[t]], gold_pair[:, 0])
    assert torch.equal(pair.sum(dim=1), ctx[:, 0])
    with pytest.raises(ValueError, match="positions"):
        tables.lookup(tokens[:t], torch.tensor([t]))
