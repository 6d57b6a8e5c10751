"""ProbeRoute on our artifacts: layer x horizon probe maps, probe-initialized sparse layer routing for
frozen-backbone multi-token prediction (MTP), and the same idea for the mixer's gate (GATE_INPUT=probe_sparse).

  python analysis/probe_route.py ARTIFACT --out DIR [--seeds 3] [--train-tokens N] [--val-tokens N] [--top-m M]

Method: ProbeRoute (Uyar 2026, github.com/aliuyar1234/proberoute). The backbone is never unfrozen: every row of
GPT.layer_states (each virtual layer under depth recurrence) is computed once, normalized as the final layer is
(model.final_norm), and everything below trains small heads on those frozen features.
1. Probe map: per layer l and horizon h = 1..4, a softmax linear probe from the state at t-1 (the one that scores
   target t) to token t-1+h, fitted on the first N train tokens, scored on the first M val tokens: top-1, top-5,
   NLL.
2. MTP heads for h = 2..4 reading (a) the last layer, (b) a dense softmax mix of all layers, (c) ProbeRoute: a
   top-m mix whose router logits start at the z-scored probe top-5 of that horizon, (d) the same router randomly
   initialized. Same tokens, epochs and optimizer for each. Metrics: top-1 h2-4, the draft acceptance proxy,
   NLL h1-4 (h = 1 is the model's own head), paired bootstrap intervals over val documents.
3. Gate: the trainer's gate Linear(D, 1 + K) reading the last layer vs a top-m layer mix initialized from probes
   of "which expert gives the gold token the most probability", both trained on the same train tokens against
   the frozen training tables (train_gpt.expert_inputs / table_mask, leave-future-out), the neural model
   frozen. Scored as the full mixture with a causal score-then-update cache on the val slice, exactly as
   train_gpt.evaluate_stream without TTT (checked against it in the run): BPB and a paired bootstrap.

The model is loaded only through train_gpt.model_from_artifact; data and shape come from the environment as the
trainer reads it (DATA_PATH, TOKENIZER_PATH, NUM_LAYERS, ...), each unset variable defaulting to
configs/sample_cpu.env. Writes DIR/probe_route.json and DIR/probe_route.png.
Tests: python -m pytest -q tests/test_probe_route.py
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from devkit import read_env_file  # noqa: E402
from records.compare import bpb, document_ids, ratio_bootstrap  # noqa: E402

BOS_ID = 1
PROBE_HORIZONS = (1, 2, 3, 4)
MTP_HORIZONS = (2, 3, 4)
MTP_VARIANTS = ("last", "dense", "probe_sparse", "random_sparse")
GATE_VARIANTS = ("last", "dense", "probe_sparse")
# Minibatch Adam on frozen features: 4096 rows per step keeps a [4096, 1024] logit block in cache on 2 cores.
BATCH_ROWS = 4096
BOOTSTRAP_RESAMPLES = 2000


# -----------------------------
# FITTING ON FROZEN FEATURES
# -----------------------------


def fit(module: nn.Module, batch_loss, n_rows: int, epochs: int, lr: float, seed: int,
        param_lrs: dict | None = None) -> nn.Module:
    """Minibatch Adam over `epochs` shuffled passes of rows [0, n_rows); batch_loss(index [B] int64) -> scalar.
    param_lrs maps a parameter (by identity) to its own learning rate (the routers move faster than heads)."""
    special = {id(p): r for p, r in (param_lrs or {}).items()}
    groups = [dict(params=[p for p in module.parameters() if id(p) not in special], lr=lr)]
    groups += [dict(params=[p], lr=r) for p, r in (param_lrs or {}).items()]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(n_rows, generator=generator).split(BATCH_ROWS):
            optimizer.zero_grad(set_to_none=True)
            batch_loss(index).backward()
            optimizer.step()
    return module


def fit_probe(features: Tensor, targets: Tensor, num_classes: int, epochs: int, lr: float, seed: int,
              init_bias: Tensor | None = None) -> nn.Linear:
    """Softmax linear probe features [P, D] float32 -> targets [P] int64 in [0, num_classes), with bias. It starts
    at zero weights and init_bias [num_classes] (default 0): a convex fit, so the start only sets the budget."""
    probe = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.copy_(init_bias if init_bias is not None else torch.zeros(num_classes))
    return fit(probe, lambda i: F.cross_entropy(probe(features[i]), targets[i]), len(targets), epochs, lr, seed)


def log_unigram(tokens: Tensor, vocab_size: int) -> Tensor:
    """[V] float32 add-one log unigram frequencies: the start of every vocabulary head (probe or MTP)."""
    counts = torch.bincount(tokens, minlength=vocab_size).float() + 1.0
    return (counts / counts.sum()).log()


@torch.no_grad()
def classify(head, rows: int, targets: Tensor, top_k: int = 5) -> dict[str, Tensor]:
    """Per-row results of head(index) -> logits [B, C] on rows [0, rows): nll [P] float64, top1 / topk [P] bool,
    argmax [P] int64."""
    nll, top1, topk, argmax = [], [], [], []
    for index in torch.arange(rows).split(BATCH_ROWS):
        logits = head(index).float()
        y = targets[index]
        nll.append(F.cross_entropy(logits, y, reduction="none").double())
        ranked = logits.topk(min(top_k, logits.shape[1]), dim=1).indices
        argmax.append(ranked[:, 0])
        top1.append(ranked[:, 0] == y)
        topk.append((ranked == y[:, None]).any(dim=1))
    return dict(nll=torch.cat(nll), top1=torch.cat(top1), topk=torch.cat(topk), argmax=torch.cat(argmax))


def probe_layers(train_feats: Tensor, train_targets: Tensor, val_feats: Tensor, val_targets: Tensor,
                 num_classes: int, epochs: int, lr: float, seed: int, init_bias: Tensor | None = None) -> dict:
    """One probe per layer row of train_feats [L, P, D] (targets [P] int64), scored on val_feats [L, Q, D]:
    {"top1", "top5", "nll"} -> [L] float (means over the val rows)."""
    scores = dict(top1=[], top5=[], nll=[])
    for layer in range(train_feats.shape[0]):
        probe = fit_probe(train_feats[layer], train_targets, num_classes, epochs, lr, seed + layer, init_bias)
        result = classify(lambda i: probe(val_feats[layer][i]), len(val_targets), val_targets)
        scores["top1"].append(result["top1"].float().mean().item())
        scores["top5"].append(result["topk"].float().mean().item())
        scores["nll"].append(result["nll"].mean().item())
    return scores


# -----------------------------
# ROUTING
# -----------------------------


def router_logits_from_scores(scores) -> Tensor:
    """Initial router logits [L] float32 from per-layer probe scores (higher = better): z-scores, so the ordering
    and relative gaps of the probe map carry over whatever the score's scale."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    return (scores - scores.mean()) / scores.std(unbiased=False).clamp_min(1e-6)


class TopMRouter(nn.Module):
    """Sparse layer router: learned logits [L]; the m layers with the largest logits get softmax weights over
    those m, every other layer exactly 0. m = L is the dense weighted mix; m = 1 reads one layer."""

    def __init__(self, init_logits: Tensor, m: int):
        super().__init__()
        if not 1 <= m <= len(init_logits):
            raise ValueError(f"top-m router: m={m} must be in [1, {len(init_logits)}] (number of layer rows)")
        self.m = m
        self.logits = nn.Parameter(torch.as_tensor(init_logits, dtype=torch.float32).clone())

    def weights(self) -> Tensor:  # [L] float32, m nonzero entries summing to 1
        chosen = self.logits.topk(self.m).indices
        return torch.zeros_like(self.logits).scatter(0, chosen, self.logits[chosen].softmax(0))


class RoutedLinear(nn.Module):
    """A linear head on the router's mix of frozen, normalized layer states, renormalized as the final layer is:
    feats [L, B, D] -> [B, C]. With a one-layer router reading the last row it is the model's own head layout."""

    def __init__(self, router: TopMRouter, out: nn.Linear):
        super().__init__()
        self.router, self.out = router, out

    def forward(self, feats: Tensor) -> Tensor:
        mix = torch.einsum("l,lbd->bd", self.router.weights(), feats)
        return self.out(F.rms_norm(mix, (mix.shape[-1],)))


def make_router(variant: str, num_layers: int, top_m: int, probe_scores, seed: int) -> TopMRouter:
    """The router of one compared variant: last layer, dense mix, ProbeRoute (probe-initialized top-m), or the
    same top-m router randomly initialized (the seed's ablation)."""
    if variant == "last":
        return TopMRouter(torch.arange(num_layers, dtype=torch.float32), 1)
    if variant == "dense":
        return TopMRouter(torch.zeros(num_layers), num_layers)
    if variant == "probe_sparse":
        return TopMRouter(router_logits_from_scores(probe_scores), top_m)
    if variant == "random_sparse":
        return TopMRouter(torch.randn(num_layers, generator=torch.Generator().manual_seed(seed)), top_m)
    raise ValueError(f"unknown router variant {variant!r}")


def acceptance_length(draft_correct: Tensor) -> Tensor:
    """Speculative-draft acceptance proxy per position: draft_correct [P, H] bool says whether the greedy draft
    of horizons 2..H+1 equals the gold token. The model's own next token is always accepted (1), then drafts are
    accepted up to the first miss: 1 + length of the leading run of True. Returns [P] float64."""
    return 1.0 + draft_correct.long().cumprod(dim=1).sum(dim=1).double()


# -----------------------------
# STATISTICS
# -----------------------------
# Intervals come from records/compare.py's ratio bootstrap over documents (the same code as compare.py's ΔBPB).


def paired_bootstrap(diff, docs, weights=None, seed: int = 0) -> dict:
    """Mean per-token difference (sum diff / sum weights) with a 95% percentile interval from resampling whole
    documents (per-token results inside a document are not independent). diff [P] float (B - A per token, same
    tokens), docs [P] int, weights [P] (default 1 per token; bytes * ln 2 turns nats into BPB)."""
    diff = np.asarray(diff, dtype=np.float64)
    weights = np.ones_like(diff) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (diff.shape == np.shape(docs) == weights.shape):
        raise ValueError(f"paired_bootstrap: diff {diff.shape}, docs {np.shape(docs)}, weights {weights.shape} differ")
    result = ratio_bootstrap(diff, weights, np.asarray(docs), BOOTSTRAP_RESAMPLES, seed)
    return dict(mean=result.delta_bpb, low=result.low, high=result.high, docs=result.units)


# -----------------------------
# FROZEN FEATURES FROM AN ARTIFACT
# -----------------------------


@dataclass
class Features:
    """Per scored target t (positions, ascending): every layer row's normalized state at t-1, and the model's own
    next-token head and gate there."""
    positions: Tensor  # [P] int64, targets t in [1, N)
    states: Tensor  # [L, P, D] float32, model.final_norm(layer state at t-1)
    neural_logprob: Tensor  # [P] float32, log p_model(tokens[t])
    neural_argmax: Tensor  # [P] int64
    gate_logits: Tensor | None  # [P, 1 + K] float32 of the model's own gate


@torch.no_grad()
def extract_features(model, tokens: Tensor, seq_len: int, stride: int, windows_per_batch: int = 64) -> Features:
    """Run the frozen model over sliding windows exactly as train_gpt.score_span does (window_schedule; stride =
    seq_len gives non-overlapping windows) and keep every layer row's state for each scored target."""
    import ngram_mixer as nm

    model.eval()
    start, lo, hi = nm.window_schedule(1, len(tokens), seq_len, stride)
    offsets = torch.arange(seq_len)
    positions, states, logprob, argmax, gates = [], [], [], [], []
    for i in range(0, len(start), windows_per_batch):
        batch = slice(i, i + windows_per_batch)
        input_index = (start[batch, None] + offsets).clamp(max=len(tokens) - 1)
        target_index = input_index + 1
        scored = (target_index >= lo[batch, None]) & (target_index < hi[batch, None])
        rows = torch.stack([model.final_norm(s[scored]) for s in model.layer_states(tokens[input_index])])
        logits = model.logits(rows[-1])
        targets = tokens[target_index[scored]]
        positions.append(target_index[scored])
        states.append(rows)
        logprob.append(logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1))
        argmax.append(logits.argmax(-1))
        if model.gate is not None:
            gates.append(model.gate_logits(rows[-1]))
    positions = torch.cat(positions)
    if not bool((positions.diff() > 0).all()):
        raise RuntimeError("window_schedule did not score each target once in order")
    return Features(positions, torch.cat(states, dim=1), torch.cat(logprob), torch.cat(argmax),
                    torch.cat(gates) if gates else None)


def causal_cache_experts(tokens: Tensor, vocab_size: int, orders, chunk_tokens: int, min_count: int,
                         discount: float, document=None):
    """The cache experts' ([K, N-1] probs, [K, N-1] valid, [N-1, F] count features) of every target 1..N-1, as
    train_gpt.evaluate_stream sees them: the cache starts empty, each target also counts its chunk's earlier
    tokens, and the cache receives each chunk only after the chunk has been scored."""
    import ngram_mixer as nm
    from ngram_mixer import NgramTables

    cache = NgramTables(vocab_size, (1,) + tuple(orders))
    bounds = nm.chunk_bounds(len(tokens), chunk_tokens)
    probs, valid, features = [], [], []
    for first, end in zip(bounds[:-1], bounds[1:]):
        p, v, f = nm.expert_inputs(cache, tokens, torch.arange(first, end), min_count, discount=discount,
                                   document=document)
        probs.append(p)
        valid.append(v)
        features.append(f)
        cache.extend(tokens[cache.num_tokens:end])
    return torch.cat(probs, dim=1), torch.cat(valid, dim=1), torch.cat(features)


def best_expert(neural_logprob: Tensor, expert_probs: Tensor, expert_valid: Tensor) -> Tensor:
    """[P] int64: the slot (0 = neural, k + 1 = expert k) that gives the gold token the most probability, the
    quantity the gate must judge; an invalid expert never wins (ties go to the lower slot)."""
    expert_lp = torch.where(expert_valid, expert_probs.double().log(), -math.inf)
    return torch.cat([neural_logprob.double()[None], expert_lp]).argmax(dim=0)


# -----------------------------
# THE ANALYSIS
# -----------------------------


def horizon_targets(tokens: Tensor, positions: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """(targets [P] int64, valid [P] bool): token t-1+h for the state at t-1; invalid past the stream end."""
    index = positions + horizon - 1
    valid = index < len(tokens)
    return tokens[index.clamp(max=len(tokens) - 1)], valid


def probe_map(train: Features, train_tokens: Tensor, val: Features, val_tokens: Tensor, vocab_size: int,
              init_bias: Tensor, epochs: int, lr: float, seed: int) -> dict:
    """Layer x horizon probe map: {"top1", "top5", "nll"} -> [L][H] lists over PROBE_HORIZONS."""
    table = dict(top1=[], top5=[], nll=[])
    for horizon in PROBE_HORIZONS:
        y_train, ok_train = horizon_targets(train_tokens, train.positions, horizon)
        y_val, ok_val = horizon_targets(val_tokens, val.positions, horizon)
        scores = probe_layers(train.states[:, ok_train], y_train[ok_train], val.states[:, ok_val], y_val[ok_val],
                              vocab_size, epochs, lr, seed + 100 * horizon, init_bias)
        for key in table:
            table[key].append(scores[key])
    # stored layers x horizons
    return {key: np.array(value).T.tolist() for key, value in table.items()}


def train_mtp_head(variant: str, train: Features, y_train: Tensor, ok_train: Tensor, probe_top5, init_bias,
                   top_m: int, epochs: int, lr: float, router_lr: float, seed: int) -> RoutedLinear:
    torch.manual_seed(seed)
    num_layers, dim = train.states.shape[0], train.states.shape[2]
    head = RoutedLinear(make_router(variant, num_layers, top_m, probe_top5, seed), nn.Linear(dim, len(init_bias)))
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.copy_(init_bias)
    rows = ok_train.nonzero().squeeze(1)
    return fit(head, lambda i: F.cross_entropy(head(train.states[:, rows[i]]), y_train[rows[i]]), len(rows), epochs,
               lr, seed, {head.router.logits: router_lr})


def mtp_comparison(train: Features, train_tokens: Tensor, val: Features, val_tokens: Tensor, probes: dict,
                   init_bias: Tensor, seeds: int, top_m: int, epochs: int, lr: float, router_lr: float) -> dict:
    """MTP heads h = 2..4 of every variant and seed; per-token results on val targets that have all 4 horizons."""
    docs = torch.from_numpy(document_ids(val_tokens.numpy()))[val.positions - 1]
    # Every variant is scored on the same tokens: those whose horizon-4 target exists.
    scored = horizon_targets(val_tokens, val.positions, max(PROBE_HORIZONS))[1]
    scored_rows = scored.nonzero().squeeze(1)
    own_top1 = (val.neural_argmax == val_tokens[val.positions])[scored]
    own_nll = -val.neural_logprob.double()[scored]
    per_token = {v: dict(nll=[], top1=[], accept=[]) for v in MTP_VARIANTS}
    router_mass = {v: [] for v in MTP_VARIANTS}
    for variant in MTP_VARIANTS:
        for seed in range(seeds):
            nll, correct, mass = [own_nll], [], []
            for h_index, horizon in enumerate(MTP_HORIZONS):
                y_train, ok_train = horizon_targets(train_tokens, train.positions, horizon)
                top5 = [row[PROBE_HORIZONS.index(horizon)] for row in probes["top5"]]
                head = train_mtp_head(variant, train, y_train, ok_train, top5, init_bias, top_m, epochs, lr,
                                      router_lr, 1000 * seed + 10 * h_index)
                y_val = horizon_targets(val_tokens, val.positions, horizon)[0][scored]
                result = classify(lambda i: head(val.states[:, scored_rows[i]]), len(y_val), y_val)
                nll.append(result["nll"])
                correct.append(result["top1"])
                mass.append(head.router.weights().detach().tolist())
            per_token[variant]["nll"].append(torch.stack(nll, dim=1))
            per_token[variant]["top1"].append(torch.stack(correct, dim=1))
            per_token[variant]["accept"].append(acceptance_length(torch.stack(correct, dim=1)))
            router_mass[variant].append(mass)
    summary, tokens = {}, {}
    for variant in MTP_VARIANTS:
        runs = per_token[variant]
        per_seed = [dict(top1_h2_4=float(c.float().mean()), accept=float(a.mean()), nll_h1_4=float(n.mean()),
                         top1_by_h=[float(x) for x in c.float().mean(0)], nll_by_h=[float(x) for x in n.mean(0)])
                    for n, c, a in zip(runs["nll"], runs["top1"], runs["accept"])]
        summary[variant] = dict(
            per_seed=per_seed,
            **{k: float(np.mean([s[k] for s in per_seed])) for k in ("top1_h2_4", "accept", "nll_h1_4")},
            **{f"{k}_sd": float(np.std([s[k] for s in per_seed])) for k in ("top1_h2_4", "accept", "nll_h1_4")},
            router_mass_by_h=np.mean(router_mass[variant], axis=0).T.tolist())
        # seed-averaged per-token results: the unit the paired bootstrap resamples (by document)
        tokens[variant] = dict(top1=torch.stack(runs["top1"]).float().mean((0, 2)),
                               accept=torch.stack(runs["accept"]).mean(0),
                               nll=torch.stack(runs["nll"]).mean((0, 2)))
    intervals = {f"probe_sparse-{other}": {k: paired_bootstrap((tokens["probe_sparse"][k] - tokens[other][k]).numpy(),
                                                                docs[scored].numpy())
                                            for k in ("top1", "accept", "nll")}
                 for other in MTP_VARIANTS if other != "probe_sparse"}
    return dict(variants=summary, paired_bootstrap=intervals, scored_tokens=int(scored.sum()),
                own_head=dict(top1_h1=float(own_top1.float().mean()), nll_h1=float(own_nll.mean())))


def gate_nll(gate: RoutedLinear, feats: Features, probs: Tensor, valid: Tensor, floor: float, rows: Tensor):
    """Mixture NLL [B] (nats) at feature rows `rows` with this gate; probs / valid [K, P] are the experts there."""
    from ngram_mixer import mixture_logprob, mixture_weights

    weights = mixture_weights(gate(feats.states[:, rows]), valid[:, rows], floor)
    return -mixture_logprob(feats.neural_logprob[rows], probs[:, rows], valid[:, rows], weights)


def gate_comparison(model, args, train: Features, train_stream: Tensor, prefill_tokens: int, val: Features,
                    val_tokens: Tensor, byte_tables, document, seeds: int, top_m: int, epochs: int, lr: float,
                    router_lr: float) -> dict:
    """GATE_INPUT=last vs probe_sparse (and dense), each trained on the frozen training tables (the trainer's
    leave-future-out view) with the neural model frozen, scored as the full mixture with the causal val cache (no
    TTT). The offline gates read hidden states only; the artifact's own gate also reads the count features."""
    import ngram_mixer as nm
    from ngram_mixer import NgramTables, mixture_logprob, mixture_weights

    orders = args.ngram_orders
    if not orders or model.gate is None:
        raise ValueError("the gate comparison needs an artifact trained with NGRAM=1 (a gate and n-gram orders)")
    tables = NgramTables(args.vocab_size, (1,) + orders)
    tables.extend(train_stream[:prefill_tokens])
    # Train positions are the first pass over the stream, so stream position == index (no wrap-around).
    in_table = nm.table_mask(tables.orders, torch.arange(len(train_stream)), prefill_tokens)
    train_probs, train_valid, _ = nm.expert_inputs(tables, train_stream, train.positions, args.ngram_min_count,
                                                   in_table=in_table, discount=args.ngram_discount,
                                                   document=document)
    del tables
    val_probs, val_valid, val_features = causal_cache_experts(val_tokens, args.vocab_size, orders,
                                                              args.eval_chunk_tokens, args.ngram_min_count,
                                                              args.ngram_discount, document)
    rows = val.positions - 1
    val_probs, val_valid, val_features = val_probs[:, rows], val_valid[:, rows], val_features[rows]
    floor = model.neural_floor
    val_bytes = nm.count_target_bytes(val_tokens[val.positions - 1], val_tokens[val.positions], byte_tables).double()
    docs = document_ids(val_tokens.numpy())[val.positions - 1]

    # The gate probe's target: which slot gives the gold token the most probability.
    probe_train = best_expert(train.neural_logprob, train_probs, train_valid)
    probe_val = best_expert(val.neural_logprob, val_probs, val_valid)
    probe_scores = probe_layers(train.states, probe_train, val.states, probe_val, 1 + args.ngram_experts, epochs, lr, 7)
    # Router init from the probes' held-out NLL (lower is better); top-1 is flat where one class dominates.
    router_scores = [-x for x in probe_scores["nll"]]
    with torch.no_grad():
        own_logits = val.gate_logits + (model.gate_features(val_features) if model.gate_features is not None else 0)
    own_weights = mixture_weights(own_logits, val_valid, floor)
    own_nll = -mixture_logprob(val.neural_logprob, val_probs, val_valid, own_weights).double()
    per_variant, per_token = {}, {}
    for variant in GATE_VARIANTS:
        runs = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            gate = RoutedLinear(make_router(variant, train.states.shape[0], top_m, router_scores, seed),
                                nn.Linear(train.states.shape[2], 1 + args.ngram_experts))
            with torch.no_grad():
                # train_gpt's gate init: zero weights, +2 on the neural slot
                gate.out.weight.zero_()
                gate.out.bias.zero_()[0] = 2.0
            fit(gate, lambda i, g=gate: gate_nll(g, train, train_probs, train_valid, floor, i).mean(),
                len(train.positions), epochs, lr, seed, {gate.router.logits: router_lr})
            with torch.no_grad():
                nll = torch.cat([gate_nll(gate, val, val_probs, val_valid, floor, i).double()
                                 for i in torch.arange(len(val.positions)).split(BATCH_ROWS)])
            runs.append(dict(nll=nll, mass=gate.router.weights().detach().tolist()))
        per_token[variant] = torch.stack([r["nll"] for r in runs]).mean(0)
        per_variant[variant] = dict(bpb_per_seed=[bpb(r["nll"], val_bytes) for r in runs],
                                    bpb=float(np.mean([bpb(r["nll"], val_bytes) for r in runs])),
                                    val_loss=float(np.mean([float(r["nll"].mean()) for r in runs])),
                                    router_mass=np.mean([r["mass"] for r in runs], axis=0).tolist())
    weights = (val_bytes * math.log(2.0)).numpy()
    per_token["own_gate"] = own_nll
    pairs = [("probe_sparse", "last"), ("probe_sparse", "dense"), ("probe_sparse", "own_gate"), ("last", "own_gate")]
    intervals = {f"{a}-{b}": paired_bootstrap((per_token[a] - per_token[b]).numpy(), docs, weights) for a, b in pairs}
    return dict(probe_target_share=np.bincount(probe_val.numpy(), minlength=1 + args.ngram_experts).tolist(),
                probe_scores=probe_scores, router_init_scores=router_scores, variants=per_variant,
                own_gate=dict(bpb=bpb(own_nll, val_bytes), val_loss=float(own_nll.mean())),
                paired_bootstrap_bpb=intervals,
                scored_tokens=len(val.positions), scored_bytes=int(val_bytes.sum()),
                train_tokens=len(train.positions), prefill_tokens=prefill_tokens, orders=list(orders))


def plot(result: dict, path: Path) -> None:
    """Heatmaps (layer rows x horizons): probe top-1, top-5, NLL, and where ProbeRoute's learned router puts its
    mass (mean over seeds). Colour is scaled within each horizon column (the depth structure is the point; h = 1
    would swamp one global scale); the cells print the raw values."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = result["probe_map"]
    mass = result["mtp"]["variants"]["probe_sparse"]["router_mass_by_h"]
    # (title, layers x horizons values, horizons, higher is better)
    panels = [("probe top-1", probes["top1"], PROBE_HORIZONS, True),
              ("probe top-5", probes["top5"], PROBE_HORIZONS, True),
              ("probe NLL (nats)", probes["nll"], PROBE_HORIZONS, False),
              ("ProbeRoute router mass", mass, MTP_HORIZONS, True)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.5 * len(mass) + 2.0))
    for ax, (title, values, horizons, higher_better) in zip(axes, panels):
        values = np.asarray(values)
        low, high = values.min(axis=0), values.max(axis=0)
        shade = (values - low) / np.where(high > low, high - low, 1.0)
        darkness = shade if higher_better else 1.0 - shade
        ax.imshow(darkness, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        for (row, col), value in np.ndenumerate(values):
            ax.text(col, row, f"{value:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if darkness[row, col] > 0.6 else "black")
        ax.set_xticks(range(len(horizons)), [f"h={h}" for h in horizons])
        ax.set_yticks(range(len(values)), [str(i + 1) for i in range(len(values))])
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("layer row (layer_states order)")
    fig.suptitle("darker = better within each horizon column", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def apply_config_defaults(config: Path) -> None:
    """Every variable of the config file that the environment does not set yet (the sample model's shape and
    data by default), so that Hyperparameters reads what the trainer of this artifact read."""
    for name, value in read_env_file(config).items():
        os.environ.setdefault(name, value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="a final_model.*.ptz written by train_gpt.py")
    parser.add_argument("--out", type=Path, required=True, help="folder for probe_route.json / probe_route.png")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of every trained head and gate")
    parser.add_argument("--train-tokens", type=int, default=200_000, help="train-stream targets the heads fit")
    parser.add_argument("--val-tokens", type=int, default=131_072, help="first val tokens scored")
    parser.add_argument("--top-m", type=int, default=2, help="layers the sparse routers read")
    parser.add_argument("--epochs", type=int, default=2, help="passes of minibatch Adam for every head")
    parser.add_argument("--lr", type=float, default=3e-2, help="Adam LR of probes, heads and gates")
    parser.add_argument("--router-lr", type=float, default=1e-1, help="Adam LR of the router logits")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "sample_cpu.env",
                        help="env file whose variables fill in the ones the environment does not set")
    opts = parser.parse_args(argv)
    for name in ("seeds", "train_tokens", "val_tokens", "top_m", "epochs"):
        if getattr(opts, name) < (2 if name == "val_tokens" else 1):
            raise ValueError(f"--{name.replace('_', '-')}={getattr(opts, name)} is too small")
    if not opts.artifact.is_file():
        raise FileNotFoundError(f"ARTIFACT {opts.artifact} is not a file")
    apply_config_defaults(opts.config)
    # train_gpt reads its Hyperparameters from the environment, so it is imported only once that is set.
    tg, nm = importlib.import_module("train_gpt"), importlib.import_module("ngram_mixer")
    args = tg.Hyperparameters()
    device = torch.device("cpu")
    t0 = time.perf_counter()
    timings = {}

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
        print(f"{name}: {timings[name]:.1f}s", flush=True)

    model = tg.model_from_artifact(args, opts.artifact, device)
    for p in model.parameters():
        p.requires_grad_(False)
    sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
    byte_tables, document = tg.build_byte_tables(sp, args.vocab_size, device), args.document_cache(sp.bos_id())
    val_tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, opts.val_tokens)
    train_files = tg.list_shards(args.data_path, "train")
    stream = tg.TokenStream(train_files, args.vocab_size)
    if opts.train_tokens + 1 > stream.total_tokens:
        raise ValueError(f"--train-tokens={opts.train_tokens} exceeds the {stream.total_tokens} train tokens "
                         f"under DATA_PATH={args.data_path}")
    # The trainer's frozen tables hold the first NGRAM_PREFILL_TOKENS of the train stream.
    prefill_tokens = min(args.ngram_prefill_tokens, stream.total_tokens) if args.ngram else 0
    train_stream = stream.take(max(prefill_tokens, opts.train_tokens + 1)).long()
    train = extract_features(model, train_stream[:opts.train_tokens + 1], args.train_seq_len, args.train_seq_len)
    val = extract_features(model, val_tokens, args.train_seq_len, args.eval_stride)
    init_bias = log_unigram(train_stream[1:opts.train_tokens + 1], args.vocab_size)
    lap("features")
    result = dict(artifact=str(opts.artifact), num_layer_rows=int(train.states.shape[0]),
                  model_dim=int(train.states.shape[2]), train_targets=len(train.positions),
                  val_targets=len(val.positions), options={k: str(v) for k, v in vars(opts).items()},
                  data_path=args.data_path)
    result["probe_map"] = probe_map(train, train_stream, val, val_tokens, args.vocab_size, init_bias, opts.epochs,
                                    opts.lr, seed=0)
    lap("probe_map")
    result["mtp"] = mtp_comparison(train, train_stream, val, val_tokens, result["probe_map"], init_bias,
                                   opts.seeds, opts.top_m, opts.epochs, opts.lr, opts.router_lr)
    lap("mtp")
    if args.ngram:
        result["gate"] = gate_comparison(model, args, train, train_stream, prefill_tokens, val, val_tokens, byte_tables,
                                         document, opts.seeds, opts.top_m, opts.epochs, opts.lr, opts.router_lr)
        # The offline mixture must be train_gpt's own evaluation (cache, no TTT) with the artifact's gate.
        setup = nm.EvalSetup(model, model.hidden, val_tokens, byte_tables, args.train_seq_len, args.eval_stride,
                             max(1, args.val_batch_size // args.train_seq_len), 0, 1, args.ngram_min_count,
                             ngram_discount=args.ngram_discount, document=document)
        reference = nm.evaluate_stream(setup, nm.chunk_bounds(len(val_tokens), args.eval_chunk_tokens),
                                      nm.NgramTables(args.vocab_size, (1,) + args.ngram_orders), nm.LearningConfig())
        result["gate"]["own_gate"]["train_gpt_eval_bpb"] = reference.val_bpb
        result["gate"]["own_gate"]["abs_diff_vs_train_gpt_eval"] = abs(reference.val_bpb -
                                                                       result["gate"]["own_gate"]["bpb"])
        lap("gate")
    result["timings_s"] = dict(timings, total=round(time.perf_counter() - t0, 1))
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "probe_route.json").write_text(json.dumps(result, indent=1))
    plot(result, opts.out / "probe_route.png")
    print(json.dumps({k: result[k] for k in ("probe_map", "timings_s")}))
    for variant, row in result["mtp"]["variants"].items():
        print(f"mtp {variant}: top1_h2_4 {row['top1_h2_4']:.4f} accept {row['accept']:.4f} "
              f"nll_h1_4 {row['nll_h1_4']:.4f}")
    if "gate" in result:
        gate = result["gate"]
        print(f"gate own {gate['own_gate']['bpb']:.5f} (train_gpt eval {gate['own_gate']['train_gpt_eval_bpb']:.5f}) "
              + " ".join(f"{v} {row['bpb']:.5f}" for v, row in gate["variants"].items()))
        print(json.dumps(gate["paired_bootstrap_bpb"]))
    return result


if __name__ == "__main__":
    main()
