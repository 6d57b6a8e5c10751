"""The legality audit against planted bugs: each one that could make a score better than the truth must fail the
audit or stop the run. The honest evaluation must pass with its causal deltas exactly 0.

Run:  python -m pytest -q tests/test_audit.py
"""
import pytest
import torch

import train_gpt as tg
from ngram_mixer import DocumentCache, NgramTables
from test_mixer_eval import ORDERS, mixer_model
from test_train_gpt import make_setup

AUDITED = torch.arange(150, 768, 13)


@pytest.fixture(scope="module")
def tokens(sample_val_tokens):
    return sample_val_tokens[:769].clone()


def audit_model(document_order=0):
    """The tiny mixer model with random output projections: freshly initialized ones are zero, which would make
    attention (and so any attention bug) invisible."""
    model = mixer_model(document_order=document_order)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * 0.1)
    return model


def evaluate(tokens, cache=None, ttt_epochs=1, document=None):
    setup = make_setup(audit_model(len(document.orders) if document else 0), tokens, 32, 8)
    setup.min_count, setup.document = 1, document
    cache = NgramTables(1024, (1,) + ORDERS) if cache is None else cache
    ttt = tg.TTTConfig(ttt_epochs, lr=0.05, cosine=True, grad_clip=1.0, gate_steps=4, gate_lr=0.05)
    return tg.eval_ngram_ttt(setup, tg.chunk_bounds(len(tokens), 96), cache, ttt, tg.LegalityAudit(AUDITED, 0))


def test_honest_evaluation_passes_with_exact_causal_deltas(tokens):
    result = evaluate(tokens)
    count, sum_err, gold_err, future_delta = result.audit
    assert count == len(AUDITED) and not tg.audit_fails(result.audit)
    assert sum_err < 1e-6 and gold_err < 1e-6 and future_delta == 0.0


def test_gold_dependent_expert_mask_fails(tokens, monkeypatch):
    honest = tg.expert_inputs

    def gold_mask(*args, **kwargs):
        probs, valid, features = honest(*args, **kwargs)
        # "use an expert only where it gives the target a fair probability": that peeks at the target
        return probs, valid & (probs > 0.05), features

    monkeypatch.setattr(tg, "expert_inputs", gold_mask)
    result = evaluate(tokens)
    assert tg.audit_fails(result.audit) and result.audit[1] > 1e-4


def test_probability_inflated_by_9e_5_fails(tokens, monkeypatch):
    honest = tg.mix

    def inflated(setup, cache, h, neural_lp, stream, positions, targets=None, **kwargs):
        lp, weights = honest(setup, cache, h, neural_lp, stream, positions, targets, **kwargs)
        if everywhere or targets is None:
            lp = torch.log(lp.double().exp() + 9e-5).float()
        return lp, weights

    everywhere = True
    monkeypatch.setattr(tg, "mix", inflated)
    assert tg.audit_fails(evaluate(tokens).audit)
    # only the scored pass inflated, the enumeration honest: the gold log-probability no longer matches
    everywhere = False
    result = evaluate(tokens)
    assert tg.audit_fails(result.audit) and result.audit[1] < 1e-4 and result.audit[2] > 1e-5


def test_non_causal_attention_fails(tokens, monkeypatch):
    honest = torch.nn.functional.scaled_dot_product_attention

    def bidirectional(q, k, v, is_causal=False, **kwargs):
        return honest(q, k, v, is_causal=False, **kwargs)

    monkeypatch.setattr(tg.F, "scaled_dot_product_attention", bidirectional)
    result = evaluate(tokens, ttt_epochs=0)
    assert tg.audit_fails(result.audit) and result.audit[3] > 1e-5


def test_cache_extended_before_scoring_stops_the_run(tokens, monkeypatch):
    honest = tg.score_span

    def extend_first(setup, first, end, cache=None, *rest):
        cache.extend(setup.tokens[cache.num_tokens:end])
        return honest(setup, first, end, cache, *rest)

    monkeypatch.setattr(tg, "score_span", extend_first)
    with pytest.raises(RuntimeError, match="causality violated.*cache"):
        evaluate(tokens)


class EarlyCache(NgramTables):
    """PR #834's boundary bug: each chunk enters the cache shifted one token late, so the cache holds the next
    chunk's first target before it is scored (the token count is right, the content is not)."""

    def __init__(self, stream):
        super().__init__(1024, ORDERS)
        self.stream = stream

    def extend(self, tokens):
        super().extend(self.stream[self.num_tokens + 1:self.num_tokens + 1 + len(tokens)])


def test_cache_one_token_ahead_stops_the_run(tokens):
    with pytest.raises(RuntimeError, match="causality violated.*cache"):
        evaluate(tokens, cache=EarlyCache(tokens))


def test_ttt_on_a_chunk_before_scoring_it_stops_the_run(tokens, monkeypatch):
    honest = tg.score_span

    def train_first(setup, first, end, cache=None, *rest):
        params = list(setup.model.parameters())
        # the evaluation scores under inference_mode; this bug trains right there
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.grad = torch.zeros_like(p)
            tg.ttt_on_chunk(setup, torch.optim.SGD(params, lr=0.05), params, first, end, 1, 0.05, 0.0)
        return honest(setup, first, end, cache, *rest)

    monkeypatch.setattr(tg, "score_span", train_first)
    with pytest.raises(RuntimeError, match="causality violated.*TTT"):
        evaluate(tokens)


def test_gate_learning_from_a_chunk_before_scoring_it_stops_the_run(tokens, monkeypatch):
    honest = tg.score_span

    def learn_first(setup, first, end, cache=None, audit=None, record=None, online_gate=None):
        # score the chunk once unrecorded, learn from it, then score it for real with the gate that has seen it
        honest(setup, first, end, cache, None, None, online_gate)
        online_gate.learn(setup.model.gate_logits, setup.model.neural_floor)
        return honest(setup, first, end, cache, audit, record, online_gate)

    monkeypatch.setattr(tg, "score_span", learn_first)
    with pytest.raises(RuntimeError, match="causality violated.*the gate"):
        evaluate(tokens, ttt_epochs=0)


# ----- the document cache (the audited tokens span two documents: BOS at 0 and 523) -----

class CountsItsTarget(DocumentCache):
    """Counts the target's own occurrence as if the window ended after t: every candidate's count gains 1."""

    def counts(self, stream, positions, targets):
        context, pair = super().counts(stream, positions, targets)
        return context + 1, pair + 1


class ReadsTheNextToken(DocumentCache):
    """A unigram that also counts the token after t: still a distribution (one more count, on one token), but it
    depends on the future."""

    def counts(self, stream, positions, targets):
        context, pair = super().counts(stream, positions, targets)
        ahead = stream[(positions + 1).clamp(max=len(stream) - 1)]
        context[0] += 1
        pair[0] += (ahead == targets).long()
        return context, pair


def test_honest_document_cache_passes(tokens):
    result = evaluate(tokens, document=DocumentCache(1024, bos_id=1, max_order=3))
    count, sum_err, gold_err, future_delta = result.audit
    assert count == len(AUDITED) and not tg.audit_fails(result.audit)
    assert sum_err < 1e-6 and gold_err < 1e-6 and future_delta < 1e-6


def test_document_cache_counting_its_target_fails(tokens):
    result = evaluate(tokens, document=CountsItsTarget(1024, bos_id=1, max_order=3))
    assert tg.audit_fails(result.audit) and result.audit[1] > 1e-4


def test_document_cache_reading_the_next_token_fails(tokens):
    result = evaluate(tokens, ttt_epochs=0, document=ReadsTheNextToken(1024, bos_id=1, max_order=3))
    assert tg.audit_fails(result.audit) and result.audit[1] < 1e-4 and result.audit[3] > 1e-5


def test_scoring_rule_ignores_the_runs_bf16_autocast_and_batch_size(tokens):
    """On GPU the run scores under a bf16 autocast, and the audit re-scores a target in a batch of another size:
    there a bf16 gate rounded the gold log-probability 7.8e-3 apart and failed the audit (H200). The rule's gate
    runs in float64, outside the autocast, so neither the autocast nor the batch changes a score."""
    model = audit_model()
    with torch.no_grad():  # the gate starts at zero, which bf16 holds exactly
        model.gate.weight.normal_(generator=torch.Generator().manual_seed(2))
        model.gate_features.weight.normal_(generator=torch.Generator().manual_seed(3))
    setup = make_setup(model, tokens, 32, 8)
    cache = NgramTables(1024, (1,) + ORDERS)
    cache.extend(tokens[:400])
    positions = torch.arange(400, 480)
    generator = torch.Generator().manual_seed(4)
    h = torch.randn(len(positions), model.tok_emb.embedding_dim, generator=generator)
    neural_lp = -torch.rand(len(positions), generator=generator) * 8
    plain, _ = tg.mix(setup, cache, h, neural_lp, tokens, positions)
    setup.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    under_bf16, _ = tg.mix(setup, cache, h, neural_lp, tokens, positions)
    alone, _ = tg.mix(setup, cache, h[:7], neural_lp[:7], tokens, positions[:7])
    assert (plain - under_bf16).abs().max() < 1e-6 and (plain[:7] - alone).abs().max() < 1e-6
