"""The legality audit against planted leaks, one class each: every scheme that could make a score better than the
truth must fail the audit or stop the evaluation, with a message that names what was seen. The honest evaluation
passes with its re-score delta exactly 0. Plants replace functions by name (monkeypatch), never by line.

Run:  python -m pytest -q tests/test_audit.py
"""
import pytest
import torch

import ngram_mixer as nm
import train_gpt as tg
from ngram_mixer import CausalityViolation, DocumentCache, LegalityAudit, NgramTables, replace_tokens_from
from test_mixer_eval import ORDERS, mixer_model
from test_train_gpt import make_setup

AUDITED = torch.arange(150, 768, 13)
CHUNK = 96


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


def evaluate(tokens, cache=None, ttt_epochs=1, document=None, gate_steps=4, positions=AUDITED):
    setup = make_setup(audit_model(len(document.orders) if document else 0), tokens, 32, 8)
    setup.min_count, setup.document = 1, document
    cache = NgramTables(1024, (1,) + ORDERS) if cache is None else cache
    ttt = nm.LearningConfig(ttt_epochs, lr=0.05, cosine=True, grad_clip=1.0, gate_steps=gate_steps, gate_lr=0.05)
    return nm.evaluate_stream(setup, nm.chunk_bounds(len(tokens), CHUNK), cache, ttt, LegalityAudit(positions, 0))


def failed(result, statistic):
    """The audit's failure messages, asserting that `statistic` is among the failed checks."""
    failures = nm.audit_failures(result.audit)
    assert any(message.startswith(statistic) for message in failures), failures
    return failures


def test_honest_evaluation_passes_with_an_exact_rescore(tokens):
    result = evaluate(tokens)
    count, sum_err, gold_err, rescore_delta = result.audit
    assert count == len(AUDITED) and nm.audit_failures(result.audit) == []
    assert sum_err < 1e-6 and gold_err < 1e-6 and rescore_delta == 0.0


def test_honest_document_cache_passes(tokens):
    result = evaluate(tokens, document=DocumentCache(1024, bos_id=1, max_order=3))
    assert nm.audit_failures(result.audit) == [] and result.audit[3] == 0.0


def test_replaced_tokens_all_differ(tokens):
    replaced = replace_tokens_from(tokens, 100, torch.Generator().manual_seed(0), 1024)
    assert torch.equal(replaced[:100], tokens[:100]) and bool((replaced[100:] != tokens[100:]).all())
    assert int(replaced.max()) < 1024 and int(replaced.min()) >= 0


# ----- the scored token reaching its own score -----

def test_model_reading_the_token_it_predicts_fails(tokens, monkeypatch):
    """SmearGate-style: the hidden state at t - 1 mixes in the embedding of x_t, the token it predicts."""
    honest = tg.GPT.hidden

    def peeks(self, input_ids):
        ahead = torch.cat((input_ids[:, 1:], input_ids[:, -1:]), dim=1)
        return honest(self, input_ids) + 0.5 * self.tok_emb(ahead)

    monkeypatch.setattr(tg.GPT, "hidden", peeks)
    failures = failed(evaluate(tokens, ttt_epochs=0), "max_rescore_logp_delta")
    assert "reads them" in failures[-1]


def test_gold_logit_boost_in_every_pass_fails(tokens, monkeypatch):
    """+1 on the gold token's logit, renormalized: a full distribution, in every pass the audit's included."""
    honest = nm.forward_windows

    def boosted(setup, stream, *windows):
        positions, h, log_probs = honest(setup, stream, *windows)
        boost = torch.nn.functional.one_hot(stream[positions], log_probs.size(1))
        return positions, h, (log_probs + boost).log_softmax(-1)

    monkeypatch.setattr(nm, "forward_windows", boosted)
    failed(evaluate(tokens, ttt_epochs=0), "max_rescore_logp_delta")


def test_expert_counting_its_own_target_fails(tokens):
    """A document cache that counts the target's occurrence at t, as if its window ended after t."""

    class CountsItsTarget(DocumentCache):
        def counts(self, stream, positions, targets):
            context, pair = super().counts(stream, positions, targets)
            return context + 1, pair + (stream[positions] == targets).long()

    result = evaluate(tokens, ttt_epochs=0, document=CountsItsTarget(1024, bos_id=1, max_order=3))
    failed(result, "max_gold_logp_err")


def test_gold_only_probability_bump_under_the_old_tolerance_fails(tokens, monkeypatch):
    """+9e-5 probability on the token the val stream holds at t (the old 1e-4 sum limit let it through)."""
    honest = nm.scoring_rule

    def bumped(setup, cache, h, neural_lp, stream, positions, targets=None, **kwargs):
        lp, weights = honest(setup, cache, h, neural_lp, stream, positions, targets, **kwargs)
        gold = stream[positions] if targets is None else targets
        return torch.where(gold == stream[positions], torch.log(lp.double().exp() + 9e-5).float(), lp), weights

    monkeypatch.setattr(nm, "scoring_rule", bumped)
    failures = nm.audit_failures(evaluate(tokens, ttt_epochs=0).audit)
    assert {m.split(":")[0] for m in failures} >= {"max_abs_sum_err", "max_gold_logp_err"}, failures


# ----- a scored pass that differs from the rule the audit re-runs -----

def test_scored_pass_only_boost_fails(tokens, monkeypatch):
    """+1e-4 nats on the scored gold only (the call without candidates): not even a distribution any more."""
    honest = nm.scoring_rule

    def scored_only(setup, cache, h, neural_lp, stream, positions, targets=None, **kwargs):
        lp, weights = honest(setup, cache, h, neural_lp, stream, positions, targets, **kwargs)
        return (lp + 1e-4 if targets is None else lp), weights

    monkeypatch.setattr(nm, "scoring_rule", scored_only)
    failed(evaluate(tokens, ttt_epochs=0), "max_gold_logp_err")


def test_neural_boost_on_the_val_stream_only_fails(tokens, monkeypatch):
    """A neural boost that fires only when the forward reads the val stream itself, not a re-run's copy."""
    honest = nm.forward_windows

    def on_val_only(setup, stream, *windows):
        positions, h, log_probs = honest(setup, stream, *windows)
        if stream is setup.tokens:
            boost = 0.3 * torch.nn.functional.one_hot(stream[positions], log_probs.size(1))
            log_probs = (log_probs + boost).log_softmax(-1)
        return positions, h, log_probs

    monkeypatch.setattr(nm, "forward_windows", on_val_only)
    failed(evaluate(tokens, ttt_epochs=0), "max_rescore_logp_delta")


def test_rare_scored_pass_only_boost_fails(tokens, monkeypatch):
    """+1e-4 nats at 1% of targets (t % 101 == 0) in the scored pass: the re-run of an audited batch compares
    every earlier target of the batch, so the audited targets need not hit the leaky ones."""
    honest = nm.scoring_rule

    def rare(setup, cache, h, neural_lp, stream, positions, targets=None, **kwargs):
        lp, weights = honest(setup, cache, h, neural_lp, stream, positions, targets, **kwargs)
        return (torch.where(positions % 101 == 0, lp + 1e-4, lp) if targets is None else lp), weights

    monkeypatch.setattr(nm, "scoring_rule", rare)
    # three audited targets, none leaky, each a few targets after a leaky one in the same batch of 24
    audited = torch.tensor([210, 407, 610])
    failed(evaluate(tokens, ttt_epochs=0, positions=audited), "max_rescore_logp_delta")


def test_non_causal_attention_fails(tokens, monkeypatch):
    honest = torch.nn.functional.scaled_dot_product_attention

    def bidirectional(q, k, v, is_causal=False, **kwargs):
        return honest(q, k, v, is_causal=False, **kwargs)

    monkeypatch.setattr(tg.F, "scaled_dot_product_attention", bidirectional)
    failed(evaluate(tokens, ttt_epochs=0), "max_rescore_logp_delta")


def test_gold_dependent_expert_mask_fails(tokens, monkeypatch):
    honest = nm.expert_inputs

    def gold_mask(*args, **kwargs):
        probs, valid, features = honest(*args, **kwargs)
        # "use an expert only where it gives the target a fair probability": that peeks at the target
        return probs, valid & (probs > 0.05), features

    monkeypatch.setattr(nm, "expert_inputs", gold_mask)
    failed(evaluate(tokens), "max_abs_sum_err")


# ----- state: the cache, TTT and the gate may only hold scored targets -----

def test_cache_extended_before_scoring_stops_the_run(tokens, monkeypatch):
    honest = nm.score_span

    def extend_first(setup, first, end, cache=None, *rest):
        cache.extend(setup.tokens[cache.num_tokens:end])
        return honest(setup, first, end, cache, *rest)

    monkeypatch.setattr(nm, "score_span", extend_first)
    with pytest.raises(CausalityViolation, match="causality violated.*cache"):
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
    with pytest.raises(CausalityViolation, match="causality violated.*cache"):
        evaluate(tokens, cache=EarlyCache(tokens))


def test_ttt_on_a_chunk_before_scoring_it_stops_the_run(tokens, monkeypatch):
    honest = nm.score_span

    def train_first(setup, first, end, cache=None, *rest):
        params = list(setup.model.parameters())
        # the evaluation scores under inference_mode; this bug trains right there
        with torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.grad = torch.zeros_like(p)
            nm.ttt_on_chunk(setup, torch.optim.SGD(params, lr=0.05), params, first, end, 1, 0.05, 0.0)
        return honest(setup, first, end, cache, *rest)

    monkeypatch.setattr(nm, "score_span", train_first)
    with pytest.raises(CausalityViolation, match="causality violated.*TTT"):
        evaluate(tokens)


def test_ttt_also_training_on_the_next_chunk_stops_the_run(tokens, monkeypatch):
    """TTT reports the chunk it was given but trains on it and the next, unscored one: its high-water mark comes
    from the indices it trained on, so the next chunk's first batch is refused."""
    honest = nm.ttt_on_chunk

    def one_chunk_ahead(setup, optimizer, params, first, end, *rest):
        return honest(setup, optimizer, params, first, min(end + CHUNK, len(setup.tokens)), *rest)

    monkeypatch.setattr(nm, "ttt_on_chunk", one_chunk_ahead)
    with pytest.raises(CausalityViolation, match="causality violated.*TTT"):
        evaluate(tokens, gate_steps=0)


def test_gate_learning_within_a_chunk_scored_last_first_stops_the_run(tokens, monkeypatch):
    """The gate learns after every batch while a chunk's batches are scored last-first: an earlier batch is then
    scored by a gate that has seen later targets. Checked before every batch, not once per chunk."""
    honest_schedule, honest_mix = nm.window_schedule, nm.scoring_rule

    def last_first(*args):
        return tuple(w.flip(0) for w in honest_schedule(*args))

    def learn_per_batch(setup, cache, h, neural_lp, stream, positions, targets=None, online_gate=None):
        out = honest_mix(setup, cache, h, neural_lp, stream, positions, targets, online_gate)
        if online_gate is not None:
            with torch.inference_mode(False), torch.enable_grad():
                online_gate.learn(setup.model.gate_logits, setup.model.neural_floor)
        return out

    monkeypatch.setattr(nm, "window_schedule", last_first)
    monkeypatch.setattr(nm, "scoring_rule", learn_per_batch)
    with pytest.raises(CausalityViolation, match="causality violated.*the gate"):
        evaluate(tokens, ttt_epochs=0)


def test_a_target_scored_twice_and_one_skipped_stops_the_run(tokens, monkeypatch):
    """C4: the last window of each span is replaced by a second copy of the first (its hard targets skipped)."""
    honest = nm.window_schedule

    def skip_last(*args):
        return tuple(torch.cat((w[:1], w[:-1])) for w in honest(*args))

    monkeypatch.setattr(nm, "window_schedule", skip_last)
    with pytest.raises(CausalityViolation, match="not scored exactly once"):
        evaluate(tokens, ttt_epochs=0)


# ----- where the audit looks -----

def test_sampled_positions_cover_edges_documents_and_the_first_chunk(tokens):
    bounds = nm.chunk_bounds(len(tokens), CHUNK)
    positions = LegalityAudit.sampled(tokens, bounds, 1, 64, seed=3).positions
    documents = set((torch.nonzero(tokens[:-1] == 1).flatten() + 1).tolist())
    assert bool((positions >= 1).all()) and bool((positions < len(tokens)).all())
    assert any(t < bounds[1] for t in positions.tolist())
    assert set(positions.tolist()) & set(bounds[1:-1]) and set(positions.tolist()) & {b - 1 for b in bounds[2:]}
    assert set(positions.tolist()) & documents
    other = LegalityAudit.sampled(tokens, bounds, 1, 64, seed=4).positions
    assert not torch.equal(positions, other)


def test_fresh_seeds_differ():
    assert nm.fresh_seed(torch.device("cpu")) != nm.fresh_seed(torch.device("cpu"))


def test_scoring_rule_ignores_the_runs_bf16_autocast_and_batch_size(tokens):
    """On GPU the run scores under a bf16 autocast, and the audit enumerates a target's candidates in a batch of
    another size: there a bf16 gate rounded the gold log-probability 7.8e-3 apart and failed the audit (H200). The
    rule's gate runs in float64, outside the autocast, so neither the autocast nor the batch changes a score."""
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
    plain, _ = nm.scoring_rule(setup, cache, h, neural_lp, tokens, positions)
    setup.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    under_bf16, _ = nm.scoring_rule(setup, cache, h, neural_lp, tokens, positions)
    alone, _ = nm.scoring_rule(setup, cache, h[:7], neural_lp[:7], tokens, positions[:7])
    assert (plain - under_bf16).abs().max() < 1e-6 and (plain[:7] - alone).abs().max() < 1e-6
