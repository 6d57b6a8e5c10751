"""Tests of the n-gram mixer inside training and evaluation: causality, chunking, ranks, gate learning, audit.

Run:  python -m pytest -q tests/test_mixer_eval.py
"""
import math
import re
import sys
from collections import Counter

import numpy as np

import pytest
import torch

import ngram_mixer
import ngram_mixer as nm
import train_gpt as tg
from conftest import REPO_ROOT, log_value, run_trainer
from ngram_mixer import ExpertCounts, NgramTables, mixture_logprob, mixture_weights
from test_train_gpt import make_setup, tiny_model

sys.path.insert(0, str(REPO_ROOT / "bench"))
from pr834_tables import BucketedTables  # noqa: E402

ORDERS = (2, 3, 4, 5, 6, 7)
# the production tables: the unigram base of the smoothed experts, then the experts' orders
TABLE_ORDERS = (1,) + ORDERS


def mixer_model(seed=0, document_order=0):
    """A tiny model whose gate already trusts the experts a fair amount, so cache effects show in the scores."""
    model = tiny_model(num_experts=len(ORDERS), seed=seed, document_order=document_order)
    with torch.no_grad():
        model.gate.weight.normal_(0, 0.5)
        model.gate.bias.copy_(torch.tensor([0.5] + [0.0] * (model.gate.bias.numel() - 1)))
        model.gate_features.weight.normal_(0, 0.2)
    return model


def run_eval(tokens, state, bounds, ttt_epochs, seq_len=32, stride=8, min_count=1, cache_orders=TABLE_ORDERS,
             gate_steps=0):
    model = mixer_model()
    model.load_state_dict(state)
    setup = make_setup(model, tokens, seq_len, stride)
    setup.min_count = min_count
    cache = NgramTables(1024, cache_orders) if cache_orders else None
    record = tg.TargetRecord(len(tokens) - 1, 1 + len(ORDERS), tokens.device)
    ttt = tg.LearningConfig(ttt_epochs, lr=0.05, cosine=False, grad_clip=0.0, gate_steps=gate_steps, gate_lr=0.05)
    result = nm.evaluate_stream(setup, bounds, cache, ttt, record=record)
    result.record, result.model = record, model
    return result


def test_eval_is_causal_with_cache_and_ttt(sample_val_tokens):
    tokens = sample_val_tokens[:641].clone()
    state = mixer_model().state_dict()
    bounds = tg.chunk_bounds(len(tokens), 64)
    base = run_eval(tokens, state, bounds, ttt_epochs=1, gate_steps=4).record.nll
    assert not torch.equal(base, run_eval(tokens, state, bounds, ttt_epochs=0, gate_steps=4).record.nll)  # TTT acts
    assert not torch.equal(base, run_eval(tokens, state, bounds, ttt_epochs=1).record.nll)  # the gate learns
    for t, k in ((200, 1), (200, 45), (300, 200), (639, 1)):
        changed = tokens.clone()
        changed[t + k] = (changed[t + k] + 17) % 1024
        nll = run_eval(changed, state, bounds, ttt_epochs=1, gate_steps=4).record.nll
        # Targets 1..t sit at [0, t): none of them may move; the changed target itself must.
        assert torch.equal(nll[:t], base[:t]), f"position <= {t} changed when token {t + k} changed"
        assert nll[t + k - 1] != base[t + k - 1]


def test_online_gate_scores_a_chunk_first_then_learns_only_the_gate(sample_val_tokens):
    tokens = sample_val_tokens[:641].clone()
    state = mixer_model().state_dict()
    bounds = tg.chunk_bounds(len(tokens), 128)
    fixed, online = (run_eval(tokens, state, bounds, ttt_epochs=0, gate_steps=steps) for steps in (0, 8))
    first = bounds[1] - 1  # the first chunk's targets: scored before the gate has learned anything
    assert torch.equal(online.record.nll[:first], fixed.record.nll[:first])
    assert not torch.equal(online.record.nll[first:], fixed.record.nll[first:])
    # the neural part is untouched (TTT off): only gate.* and gate_features.* moved
    assert torch.equal(online.record.neural_nll, fixed.record.neural_nll)
    moved = {name for name, p in online.model.state_dict().items() if not torch.equal(p, state[name])}
    assert moved == {"gate.weight", "gate.bias", "gate_features.weight"}
    # learning from the scored chunks lowers the loss of the later ones (deterministic: seeded model, fixed text)
    assert online.val_loss < fixed.val_loss


def reference_cache_scores(model, tokens, seq_len, min_count, discount):
    """Token by token, a classical cache: target t is scored from the model on its last seq_len tokens and from
    Counter tables of every n-gram that ends before t (whatever the chunking), interpolated absolute discounting
    written out here, and the gate reading h and the count features."""
    pair_count, context_count, followers = Counter(), Counter(), {}
    ids = tokens.tolist()
    out = torch.zeros(len(ids) - 1, dtype=torch.float64)
    for t in range(len(ids)):
        # token 0 is never a target, but its unigram counts for the targets after it
        if t > 0:
            out[t - 1] = score_reference_target(model, tokens, t, seq_len, min_count, discount, pair_count,
                                                context_count, followers)
        for n in TABLE_ORDERS:
            if t >= n - 1:
                context_count[tuple(ids[t - n + 1:t])] += 1
                pair_count[tuple(ids[t - n + 1:t + 1])] += 1
                followers.setdefault(tuple(ids[t - n + 1:t]), set()).add(ids[t])
    return out


def score_reference_target(model, tokens, t, seq_len, min_count, discount, pair_count, context_count, followers):
    """-log p(tokens[t]) of the full system from the Counter tables of the n-grams that end before t."""
    ids = tokens.tolist()
    with torch.no_grad():
        h = model.hidden(tokens[None, max(0, t - seq_len):t])[0, -1:]
    counts = torch.zeros(3, len(TABLE_ORDERS), 1, dtype=torch.int64)
    lower, probs = 1.0 / 1024, torch.zeros(len(TABLE_ORDERS), 1, dtype=torch.float64)
    for k, n in enumerate(TABLE_ORDERS):
        if t >= n - 1:
            context = tuple(ids[t - n + 1:t])
            c, u = context_count[context], len(followers.get(context, ()))
            counts[:, k, 0] = torch.tensor([c, pair_count[context + (ids[t],)], u])
            if c > 0:
                lower = (max(int(counts[1, k, 0]) - discount, 0) + discount * u * lower) / c
        probs[k, 0] = lower
    experts = ExpertCounts(*(counts[:, 1:]))
    valid = experts.context >= min_count
    features = ngram_mixer.expert_features(experts, ORDERS)
    neural = model.logits(h).log_softmax(-1)[:, ids[t]]
    weights = mixture_weights(model.gate_logits(h, features), valid, model.neural_floor)
    return -mixture_logprob(neural, probs[1:].float(), valid, weights).item()


@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_cache_scores_equal_token_by_token_reference(sample_val_tokens, seed):
    tokens = sample_val_tokens[5000:5301]
    generator = torch.Generator().manual_seed(seed)
    bounds = [1]
    while bounds[-1] < len(tokens):
        size = int(torch.randint(1, 40, (1,), generator=generator)) if bounds[-1] % 3 else 1
        bounds.append(min(bounds[-1] + size, len(tokens)))
    state = mixer_model().state_dict()
    for min_count in (1, 2):
        # stride 1 gives every target exactly its last seq_len tokens, whatever the chunking.
        got = run_eval(tokens, state, bounds, ttt_epochs=0, stride=1, min_count=min_count).record.nll
        model = mixer_model()
        model.load_state_dict(state)
        expected = reference_cache_scores(model.eval(), tokens, seq_len=32, min_count=min_count,
                                          discount=tg.EvalSetup.ngram_discount)
        assert torch.allclose(got, expected, atol=2e-5, rtol=0), (got - expected).abs().max()


def test_cache_lowers_loss_on_repetitive_text(sample_val_tokens):
    # The sample's documents repeat boilerplate; with the cache on, the score must use it (and stay valid).
    tokens = sample_val_tokens[:2049]
    state = mixer_model().state_dict()
    bounds = tg.chunk_bounds(len(tokens), 256)
    with_cache = run_eval(tokens, state, bounds, ttt_epochs=0)
    without = run_eval(tokens, state, bounds, ttt_epochs=0, cache_orders=())
    assert with_cache.val_loss < without.val_loss
    assert without.val_loss == pytest.approx(without.neural_val_loss, abs=1e-9)


class InflatedTables(NgramTables):
    """A cache that claims every looked-up token was always seen after its context (p ~ 1 for any target, the
    PR #834 failure mode)."""

    def counts(self, *args, **kwargs):
        counts = super().counts(*args, **kwargs)
        return ExpertCounts(counts.context, counts.context.clone(), counts.distinct)


def test_audit_catches_scores_that_are_not_distributions(sample_val_tokens):
    tokens = sample_val_tokens[:1025]
    state = mixer_model().state_dict()
    bounds = tg.chunk_bounds(len(tokens), 128)
    audit_positions = torch.arange(200, 1024, 7)

    def audited(cache):
        model = mixer_model()
        model.load_state_dict(state)
        setup = make_setup(model, tokens, 32, 8)
        setup.min_count = 1
        audit = tg.LegalityAudit(audit_positions, seed=0)
        return nm.evaluate_stream(setup, bounds, cache, tg.LearningConfig(), audit)

    honest = audited(NgramTables(1024, TABLE_ORDERS))
    inflated = audited(InflatedTables(1024, TABLE_ORDERS))
    bucketed = audited(BucketedTables(1024, ORDERS, buckets=1 << 12))
    for result in (honest, inflated, bucketed):
        assert result.audit[0] == len(audit_positions)
    assert tg.audit_failures(honest.audit) == [] and honest.audit[1:] < (1e-6, 1e-6, 1e-12)
    # "distributions" that do not sum to 1; both invalid scores look better, which is why they must be caught
    assert tg.audit_failures(inflated.audit) and inflated.audit[1] > 1.0
    assert tg.audit_failures(bucketed.audit) and bucketed.audit[1] > 1e-2
    # the inflated cache looks better, which is why it must be caught; the bucketed counts, read through the
    # smoothed experts (the discount taken off their ratio, no backoff mass), need not
    assert inflated.val_loss < honest.val_loss


def train_gate(stream, steps=60, seq_len=64, batch=8, seed=0):
    """Train a tiny model + gate on `stream` with frozen tables of the same stream, each position seeing them
    without its own and later n-grams, as the trainer does; return (neural CE, mixture NLL, mean expert weight)
    on the stream before and after training."""
    torch.manual_seed(seed)
    model = tiny_model(num_experts=len(ORDERS), seed=seed)
    tables = NgramTables(1024, TABLE_ORDERS)
    tables.extend(stream)
    in_table = nm.table_mask(TABLE_ORDERS, torch.arange(len(stream)), len(stream))
    gate_params = list(model.gate.parameters()) + list(model.gate_features.parameters())
    other = [p for p in model.parameters() if all(p is not g for g in gate_params)]
    optimizer = torch.optim.Adam([dict(params=other, lr=3e-3), dict(params=gate_params, lr=3e-2)])
    n_seqs = (len(stream) - 1) // seq_len

    def batch_inputs(index):
        starts = index * seq_len
        positions = (starts[:, None] + torch.arange(1, seq_len + 1)).reshape(-1)
        probs, valid, features = nm.expert_inputs(tables, stream, positions, 2, in_table=in_table, discount=0.87)
        x = stream[positions - 1].reshape(-1, seq_len)
        return x, stream[positions].reshape(-1, seq_len), probs, valid, features

    def measure():
        with torch.no_grad():
            x, y, probs, valid, features = batch_inputs(torch.arange(n_seqs))
            _, ce, mix = model(x, y, probs, valid, features)
            h = model.hidden(x).reshape(-1, model.tok_emb.embedding_dim)
            weights = tg.ngram_mixer.mixture_weights(model.gate_logits(h, features), valid, model.neural_floor)
        return ce.item(), mix.item(), weights[:, 1:].sum(1).mean().item()

    before = measure()
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss, _, _ = model(*batch_inputs(torch.randint(0, n_seqs, (batch,), generator=generator)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return before, measure()


def test_gate_learns_to_use_experts_on_repeats_and_not_on_noise():
    generator = torch.Generator().manual_seed(0)
    phrases = [torch.randint(4, 1024, (int(torch.randint(8, 30, (1,), generator=generator)),), generator=generator)
               for _ in range(40)]
    order = torch.randint(0, 40, (300,), generator=generator)
    repeats = torch.cat([phrases[i] for i in order.tolist()])[:4097]
    (_, _, weight_before), (ce, mix, weight_after) = train_gate(repeats)
    assert mix < ce - 0.5 and weight_after > weight_before
    noise = torch.randint(0, 1024, (4097,), generator=generator)
    (_, _, weight_before), (ce, mix, weight_after) = train_gate(noise)
    assert mix > ce - 0.02 and weight_after < weight_before


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("artifact")
    proc, _ = run_trainer(workdir, RUN_ID="train", ITERATIONS="3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, workdir / "final_model.train.ptz"


def test_two_process_evaluation_matches_one_process(tiny_artifact):
    workdir, artifact = tiny_artifact
    one, log1 = run_trainer(workdir, RUN_ID="eval1", EVAL_ARTIFACT=str(artifact), EVAL_DUMP="eval1.npz")
    two, log2 = run_trainer(workdir, nproc=2, script=REPO_ROOT / "tests" / "main_then_count_threads.py", RUN_ID="eval2",
                            EVAL_ARTIFACT=str(artifact), EVAL_DUMP="eval2.npz")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    # destroy_process_group joined the gloo threads on both ranks: none is left to race the interpreter's exit
    thread_counts = re.findall(r"threads_before_main:(\d+) threads_after_main:(\d+)", two.stdout)
    assert len(thread_counts) == 2 and all(before == after for before, after in thread_counts), two.stdout[-2000:]
    for key in ("scored_tokens", "scored_bytes"):
        assert log_value(log1, "scored_tokens", key) == log_value(log2, "scored_tokens", key)
    for prefix in ("final_int8_zstd_roundtrip_exact", "final_ngram_ttt_exact"):
        assert log_value(log1, prefix, "val_loss") == pytest.approx(log_value(log2, prefix, "val_loss"), abs=1e-6)
    assert log_value(log2, "legality_audit", "max_abs_sum_err") < 1e-4
    # one dump for the whole val stream, whatever the process count; it reproduces the logged score
    dumps = [np.load(workdir / f"eval{n}.npz") for n in (1, 2)]
    for key in ("bytes", "doc_id", "positions"):
        assert np.array_equal(dumps[0][key], dumps[1][key])
    for key in ("nll", "neural_nll", "gate_weights"):
        assert np.allclose(dumps[0][key], dumps[1][key], atol=1e-5)
    for dump, log in zip(dumps, (log1, log2)):
        assert len(dump["nll"]) == log_value(log, "scored_tokens", "scored_tokens")
        bpb = dump["nll"].sum() / (math.log(2) * dump["bytes"].sum())
        assert bpb == pytest.approx(float(dump["val_bpb"]), rel=1e-12)
        assert float(dump["val_bpb"]) == pytest.approx(log_value(log, "final_ngram_ttt_exact", "val_bpb"), abs=1e-8)
