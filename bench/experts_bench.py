"""Stronger valid experts on the sample val stream (1,040,059 targets): one table of BPB, hit rates, memory.

  nice -n 10 python bench/experts_bench.py --artifact A.ptz --weak-artifact W.ptz    # ~18 min on 2 shared cores

A.ptz: a train_gpt.py artifact of configs/sample_cpu.env (200 steps); W.ptz: the same config stopped early
(30-60 steps). Their per-target neural scores are cached beside each artifact (--neural-cache, --weak-cache).

Rows: n-gram caches alone (no neural model, every token p > 0), then mixtures with the sample model's per-target
neural probabilities. Every BPB is sum NLL / (ln 2 * sum bytes) over the same 1,040,059 targets, from normalized
distributions; bytes from train_gpt's build_byte_tables / count_target_bytes.
  chunk-granular: the cache holds only earlier 16,384-token chunks (EVAL_CHUNK_TOKENS of configs/sample_cpu.env);
  every-token:    the cache plus the chunk's own earlier tokens (NgramTables.counts), i.e. every token before t;
                  the bench checks that the chunked library path gives the same counts as one whole-stream call.
Fitted parameters (the backoff epsilon of the unsmoothed ML experts, discounts, the fixed lambda, the gate) are
chosen on the first 20% of targets; BPB is reported on all targets and on the last 80%. 95% intervals are paired
bootstrap intervals over documents (a document starts at each BOS id 1), records/compare.py's.
The neural per-target NLL (and the entropy / max log-prob the bench gate reads) comes from train_gpt's sliding
windows (TRAIN_SEQ_LEN / EVAL_STRIDE of configs/sample_cpu.env), computed once and cached in --neural-cache.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import optimize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import devkit  # noqa: E402
import ngram_mixer as nm  # noqa: E402
from records.compare import bpb, document_ids, fixed_mixture, paired_bootstrap  # noqa: E402

CHUNK = 16384
FIT_FRACTION = 0.2
# the weak model's slices: the first 131,072 val tokens (VAL_MAX_TOKENS of configs/sample_cpu.env), in 4 quarters
WEAK_TOKENS = 131072
WEAK_SLICES = 4


def load_train_gpt():
    # train_gpt reads its hyperparameters when Hyperparameters() is built; the sample config must be in place first
    os.environ.update(devkit.read_env_file(REPO / "configs" / "sample_cpu.env"))
    import train_gpt
    return train_gpt


def neural_per_target(tg, artifact: Path, cache_path: Path, max_tokens: int = 0) -> dict:
    """Per-target neural NLL, entropy and max log-prob, float64 [N-1] each (index t-1 for target t), from the
    artifact's model with train_gpt's window_schedule / GPT.hidden / GPT.logits as score_span uses them, over
    the first max_tokens val tokens (0 = all)."""
    if cache_path.is_file():
        with np.load(cache_path) as z:
            return {k: z[k] for k in z.files}
    args = tg.Hyperparameters()
    model = tg.model_from_artifact(args, artifact, torch.device("cpu")).eval()
    tokens = tg.load_validation_tokens(str(devkit.SAMPLE_SHARDS), args.vocab_size, max_tokens)
    start, lo, hi = nm.window_schedule(1, len(tokens), args.train_seq_len, args.eval_stride)
    out = {k: np.zeros(len(tokens) - 1) for k in ("nll", "entropy", "max_logprob")}
    offsets = torch.arange(args.train_seq_len)
    per_batch = max(1, args.val_batch_size // args.train_seq_len)
    t0 = time.time()
    with torch.inference_mode():
        for i in range(0, len(start), per_batch):
            batch = slice(i, i + per_batch)
            input_index = (start[batch, None] + offsets).clamp(max=len(tokens) - 1)
            target_index = input_index + 1
            scored = (target_index >= lo[batch, None]) & (target_index < hi[batch, None])
            logp = model.logits(model.hidden(tokens[input_index])[scored]).log_softmax(-1).double()
            positions = target_index[scored]
            out["nll"][positions - 1] = -logp.gather(1, tokens[positions][:, None])[:, 0].numpy()
            out["entropy"][positions - 1] = -(logp.exp() * logp).sum(1).numpy()
            out["max_logprob"][positions - 1] = logp.max(1).values.numpy()
    print(f"neural pass: {time.time() - t0:.0f} s, {len(tokens) - 1} targets", flush=True)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_path, **out)
    return out


def target_counts(tokens, orders, chunk_granular):
    """ExpertCounts [K, N-1] at targets 1..N-1 of the val stream. chunk_granular: the cache holds only earlier
    CHUNK-token chunks (the chunk-granular cache); else every earlier token, in one whole-stream call."""
    tables = nm.NgramTables(1024, orders)
    if not chunk_granular:
        return tables.counts(tokens, torch.arange(1, len(tokens)), chunk_start=0)
    parts = []
    for first in range(1, len(tokens), CHUNK):
        end = min(first + CHUNK, len(tokens))
        # chunk_start past every target: the table alone, no within-chunk counting
        parts.append(tables.counts(tokens, torch.arange(first, end), chunk_start=len(tokens)))
        tables.extend(tokens[tables.num_tokens:end])
    return nm.ExpertCounts(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("context", "pair", "distinct")))


def chunked_every_token_counts(tokens, orders):
    """The same counts as target_counts(chunk_granular=False), through the evaluation's path: score a chunk with
    the cache of earlier chunks plus the chunk's earlier tokens (NgramTables.counts default), then extend."""
    tables, parts = nm.NgramTables(1024, orders), []
    for first in range(1, len(tokens), CHUNK):
        end = min(first + CHUNK, len(tokens))
        parts.append(tables.counts(tokens, torch.arange(first, end)))
        tables.extend(tokens[tables.num_tokens:end])
    return nm.ExpertCounts(*(torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("context", "pair", "distinct")))


def today_probs(counts, orders, min_count, epsilon):
    """The unsmoothed ML experts (printed as "today's experts") as a cache alone: the maximum-likelihood
    distribution of the longest order (2..7) whose context was seen >= min_count times, mixed with weight epsilon
    with the add-one unigram of the cache (which alone is used where no order is valid), so every token keeps
    p > 0. float64 [P]. orders must start at 1."""
    unigram = (counts.pair[0].double() + 1) / (counts.context[0].double() + 1024)
    ml = unigram.clone()
    for k in range(1, len(orders)):
        valid = counts.context[k] >= min_count
        ml = torch.where(valid, counts.pair[k].double() / counts.context[k].clamp(min=1).double(), ml)
    return (1 - epsilon) * ml + epsilon * unigram


def fit_scalar(loss, lo, hi):
    return optimize.minimize_scalar(loss, bounds=(lo, hi), method="bounded", options=dict(xatol=1e-4)).x


def fit_gate(log_probs, features, fit):
    """A softmax gate over the columns of log_probs [P, M] (neural first, then experts) with logits = features
    [P, F] @ W + b, W zero-initialized, b fitted; LBFGS on the mixture NLL of the rows in `fit`. Returns the
    mixture NLL float64 [P] for every row."""
    x, lp = torch.as_tensor(features, dtype=torch.float64), torch.as_tensor(log_probs, dtype=torch.float64)
    mean, std = x[fit].mean(0), x[fit].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], lp.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(lp.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def nll(rows):
        return -torch.logsumexp(torch.log_softmax(x[rows] @ weight + bias, dim=1) + lp[rows], dim=1)

    def closure():
        opt.zero_grad()
        loss = nll(fit).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return nll(slice(None)).numpy()


def neural_cache_path(artifact: Path) -> Path:
    """Where the per-target neural scores of `artifact` are cached: beside it, named after its run id."""
    return artifact.with_name(f"neural_per_target.{artifact.stem.removeprefix('final_model.')}.npz")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, required=True,
                        help="final_model.<RUN_ID>.ptz of a configs/sample_cpu.env run (200 steps)")
    parser.add_argument("--neural-cache", type=Path, default=None,
                        help="default: neural_per_target.<RUN_ID>.npz beside --artifact")
    parser.add_argument("--weak-artifact", type=Path, required=True,
                        help="a model of 30-60 training steps, scored on the first WEAK_TOKENS val tokens")
    parser.add_argument("--weak-cache", type=Path, default=None,
                        help="default: neural_per_target.<RUN_ID>.npz beside --weak-artifact")
    args = parser.parse_args()
    args.neural_cache = args.neural_cache or neural_cache_path(args.artifact)
    args.weak_cache = args.weak_cache or neural_cache_path(args.weak_artifact)
    # A cached model needs no artifact; otherwise fail here, not after minutes of counting.
    for option, artifact, cache in (("--artifact", args.artifact, args.neural_cache),
                                    ("--weak-artifact", args.weak_artifact, args.weak_cache)):
        if not (artifact.is_file() or cache.is_file()):
            parser.error(f"{option} {artifact}: no such file (and no cached scores at {cache})")
    torch.set_num_threads(1)
    tg = load_train_gpt()
    tokens = torch.from_numpy(np.fromfile(devkit.SAMPLE_VAL_SHARD, dtype="<u2", offset=1024).astype(np.int64))
    byte_tables = tg.build_byte_tables(tg.load_tokenizer(str(devkit.SAMPLE_TOKENIZER), 1024), 1024, torch.device("cpu"))
    n_bytes = nm.count_target_bytes(tokens[:-1], tokens[1:], byte_tables).double().numpy()
    # target t belongs to the document that holds token t (each BOS id 1 opens one)
    doc = document_ids(tokens.numpy())
    neural = neural_per_target(tg, args.artifact, args.neural_cache)
    n_targets = len(tokens) - 1
    fit, rest = slice(0, int(FIT_FRACTION * n_targets)), slice(int(FIT_FRACTION * n_targets), None)
    print(f"sample val: {n_targets} targets, {int(n_bytes.sum())} bytes, {doc.max() + 1} documents; "
          f"fit on the first {fit.stop} targets", flush=True)

    long_orders, orders = tuple(range(1, 17)), tuple(range(1, 8))
    t0 = time.time()
    every = target_counts(tokens, long_orders, chunk_granular=False)
    count_s = time.time() - t0
    granular = target_counts(tokens, orders, chunk_granular=True)
    chunked = chunked_every_token_counts(tokens, orders)
    same = all(torch.equal(getattr(chunked, f), getattr(every, f)[:len(orders)])
               for f in ("context", "pair", "distinct"))
    print(f"counts, orders 1-16, every earlier token: {count_s:.0f} s; chunked library path (cache + within-chunk) "
          f"equals the whole-stream counts: {same}", flush=True)
    if not same:
        raise RuntimeError("within-chunk counting disagrees with counting every earlier token")

    def rows(counts, top):
        return nm.ExpertCounts(counts.context[:top], counts.pair[:top], counts.distinct[:top])

    def fitted_discount(counts):
        return fit_scalar(lambda d: -np.log(nm.smoothed_probs(rows(counts, None), 1024, d)[-1, fit].numpy()).mean(),
                          0.3, 1.0)

    results, keys = {}, []

    def report(name, nll):
        results[name] = nll
        keys.append(name)
        print(f"{name:<62} {bpb(nll, n_bytes):.4f}  {bpb(nll[rest], n_bytes[rest]):.4f}", flush=True)

    print(f"\n{'cache alone (no neural model), every token p > 0':<62} {'BPB':>6}  last80%")
    for label, counts in (("chunk-granular", granular), ("every earlier token", every)):
        eps = fit_scalar(lambda e: -np.log(today_probs(counts, orders, 2, e)[fit].numpy()).mean(), 1e-4, 0.9)
        report(f"today's experts 2-7 (ML, longest with c>=2, eps={eps:.3f}), {label}",
               -np.log(today_probs(counts, orders, 2, eps).numpy()))
    for label, counts in (("chunk-granular", granular), ("every earlier token", every)):
        report(f"classical interp. abs. discounting D=0.75 orders 1-5, {label}",
               -np.log(nm.smoothed_probs(rows(counts, 5), 1024, 0.75)[-1].numpy()))
    for top in (7, 16):
        d = fitted_discount(rows(every, top))
        report(f"interp. abs. discounting orders 1-{top}, D={d:.3f}",
               -np.log(nm.smoothed_probs(rows(every, top), 1024, d)[-1].numpy()))
    report("Witten-Bell orders 1-7", -np.log(nm.smoothed_probs(rows(every, 7), 1024, method="witten_bell")[-1].numpy()))
    expert_lp = {}
    for top in (7, 16):
        d = fitted_discount(rows(every, top))
        expert_lp[top] = torch.log(nm.smoothed_probs(rows(every, top), 1024, d)).T.numpy()
        features = nm.expert_features(rows(every, top), long_orders[:top]).numpy()
        report(f"gate over abs.-discounting experts 1-{top} (count features)", fit_gate(expert_lp[top], features, fit))
    # the document cache as train_gpt builds it (NGRAM_DOC_ORDER, NGRAM_DOC_PRIOR) above the top expert 1-7
    document = tg.Hyperparameters().document_cache(bos_id=1)
    doc_order = document.orders[-1]
    positions = torch.arange(1, len(tokens))
    doc_context, doc_pair = document.counts(tokens, positions, tokens[positions])
    doc_lp = np.log(document.probs(doc_context, doc_pair, torch.from_numpy(np.exp(expert_lp[7][:, -1]))).numpy())
    doc_features = torch.log1p(doc_context.double()).T.numpy()
    features = np.concatenate([nm.expert_features(rows(every, 7), orders).numpy(), doc_features], 1)
    report(f"gate over experts 1-7 + document cache 1-{doc_order} (count features)",
           fit_gate(np.concatenate([expert_lp[7], doc_lp[:, None]], 1), features, fit))

    print(f"\n{'with the sample model (neural per-target probabilities)':<62} {'BPB':>6}  last80%")
    neural_lp = -neural["nll"]
    report("neural alone", neural["nll"])
    classical_lp = np.log(nm.smoothed_probs(rows(every, 5), 1024, 0.75)[-1].numpy())
    best_single = expert_lp[7][:, -1]
    for label, cache_lp in (("classical cache (D=0.75, orders 1-5)", classical_lp),
                            ("abs. discounting orders 1-7, fitted D", best_single)):
        lam, mixed = fixed_mixture(neural["nll"], -cache_lp, fit)
        report(f"fixed lambda={lam:.3f} mixture, {label}", mixed)
    neural_features = np.stack([neural["entropy"], neural["max_logprob"]], axis=1)
    for top in (7, 16):
        features = np.concatenate([nm.expert_features(rows(every, top), long_orders[:top]).numpy(), neural_features], 1)
        report(f"gate over neural + experts 1-{top} (count + neural-entropy features)",
               fit_gate(np.concatenate([neural_lp[:, None], expert_lp[top]], 1), features, fit))
    features = np.concatenate([nm.expert_features(rows(every, 7), orders).numpy(), doc_features, neural_features], 1)
    report(f"gate over neural + experts 1-7 + document cache 1-{doc_order}",
           fit_gate(np.concatenate([neural_lp[:, None], expert_lp[7], doc_lp[:, None]], 1), features, fit))

    print("\npaired bootstrap over documents, BPB(a) - BPB(b) [95% interval]")
    # row indices in the order printed above
    for a, b in ((1, 0), (4, 3), (8, 3), (8, 7), (9, 7), (13, 11), (14, 11), (14, 13), (15, 13), (15, 11)):
        a, b = keys[a], keys[b]
        diff = paired_bootstrap(results[a] - results[b], n_bytes, doc, 2000, 0)
        print(f"  {a}\n  - {b}: {diff.delta_bpb:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]")

    print(f"\nweak model ({args.weak_artifact.name}) on the first {WEAK_TOKENS} val tokens, in {WEAK_SLICES} slices: "
          "BPB per slice (the gate and lambda fitted on the first 20% of these targets)")
    weak = neural_per_target(tg, args.weak_artifact, args.weak_cache, WEAK_TOKENS)
    n_weak = WEAK_TOKENS - 1
    weak_fit = slice(0, int(FIT_FRACTION * n_weak))
    weak_lp = -weak["nll"]
    cached_lp = classical_lp[:n_weak]
    lam, weak_mixed = fixed_mixture(weak["nll"], -cached_lp, weak_fit)
    features = np.concatenate([nm.expert_features(rows(every, 7), orders).numpy()[:n_weak],
                               np.stack([weak["entropy"], weak["max_logprob"]], axis=1)], 1)
    weak_rows = {"weak neural alone": weak["nll"], "classical cache alone": -cached_lp,
                 f"fixed lambda={lam:.3f} mixture, classical cache": weak_mixed,
                 "gate over weak neural + experts 1-7": fit_gate(
                     np.concatenate([weak_lp[:, None], expert_lp[7][:n_weak]], 1), features, weak_fit)}
    bounds = np.linspace(0, n_weak, WEAK_SLICES + 1).astype(int)
    for name, nll in weak_rows.items():
        print(f"  {name:<60} " + " ".join(f"{bpb(nll[a:b], n_bytes[a:b]):.4f}"
                                         for a, b in zip(bounds[:-1], bounds[1:])))

    print("\nper order, counting every earlier token: context seen >= 1 / >= 2, pair seen; distinct n-grams of the "
          "whole stream and table bytes (16 per distinct n-gram)")
    tables = nm.NgramTables(1024, long_orders)
    tables.extend(tokens)
    for k, n in enumerate(long_orders):
        distinct = tables.pair_keys[n].numel()
        seen = [(x >= m).double().mean() for x, m in ((every.context[k], 1), (every.context[k], 2), (every.pair[k], 1))]
        print(f"  order {n:2d}: " + " ".join(f"{r:.3f}" for r in seen) +
              f"   {distinct:9d} n-grams {16 * distinct / 2**20:6.1f} MiB")


if __name__ == "__main__":
    main()
