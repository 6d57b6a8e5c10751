"""Linear or log-linear mixing as the model gets stronger: both rules on one n-gram distribution, per artifact.

  python analysis/mixing_rule.py ARTIFACT [ARTIFACT ...] [--env configs/sample_cpu.env] [--max-tokens 262144]
                                 [--samples 4096]

For each artifact: the trainer's evaluation without TTT (ngram_mixer.evaluate_stream with the empty causal cache and
the online gate as configured) over the first --max-tokens val tokens. At --samples targets drawn uniformly it keeps
the full distributions over the vocabulary as they were when the target was scored: the model's log-probabilities,
and p_ng, the highest table order's smoothed n-gram distribution, by enumerating every candidate token through
ngram_mixer.expert_inputs (the legality audit's method; p_ng backs off to the uniform, so it is > 0 everywhere).
Three rules score those targets, each a full distribution that sums to 1:
  gate     the kit's scoring rule as scored: the gate's linear mixture of the model and every expert (reference);
  linear   λ p_model + (1 - λ) p_ng, one λ (records/compare.py's fixed_mixture, as bench/simple_mixture.py);
  loglin   softmax(log p_model + α log p_ng) over the vocabulary, one α (PR #1642's logits + α log p_ngram).
λ and α are fitted on the even-numbered samples and scored on the odd-numbered ones. Prints per artifact
the neural BPB on the odd samples and each rule's gain over the model with paired bootstrap intervals over
documents (records/compare.py), and the log-linear rule's gain minus the linear one's.

Why offline: the linear rule needs p_ng at the gold token only; the log-linear rule's normalizer needs it at all V
tokens of every target. A context's continuations are one key range of a table, so that is possible, but the smoothed
p_ng backs off to dense lower orders: a dense [targets, V] distribution per order, at evaluation and in training.
Unset variables come from --env (the environment wins), as the trainer reads them.
"""
import argparse
import contextlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from scipy import optimize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit import read_env_file  # noqa: E402
from records.compare import bpb, document_ids, fixed_mixture, paired_bootstrap  # noqa: E402

# where α is searched (scipy's bounded scalar minimization on the fitting half)
ALPHA_RANGE = (0.0, 2.0)


def collector_class(nm):
    class DistributionCollector(nm.LegalityAudit):
        """A LegalityAudit's hook into score_span that keeps, at its positions, the scored distributions: target t,
        the model's log-probabilities [V], log p_ng [V] and the scoring rule's log p(gold)."""

        def __init__(self, positions, cache, setup):
            super().__init__(positions, seed=0)
            self.cache, self.setup, self.kept = cache, setup, []

        def check(self, score, rescore, tokens, positions, h, log_probs, scored_lp) -> None:
            vocab = log_probs.size(1)
            candidates = torch.arange(vocab, device=tokens.device)
            for row in torch.nonzero(torch.isin(positions, self.positions)).flatten().tolist():
                at_t = torch.full((vocab,), int(positions[row]), device=tokens.device)
                probs, _, _ = nm.expert_inputs(self.cache, tokens, at_t, self.setup.min_count, candidates,
                                               discount=self.setup.ngram_discount)
                total = float(probs[-1].double().sum())
                if abs(total - 1) > 1e-5:  # float32 experts summed over V
                    raise RuntimeError(f"p_ng at target {int(positions[row])} sums to {total}, not 1")
                self.kept.append((int(positions[row]), log_probs[row].double(), probs[-1].double().log(),
                                  float(scored_lp[row])))
                self.count += 1

    return DistributionCollector


def score_rules(kept, tokens, byte_tables, nm) -> dict:
    """Per sampled target (in val order): the NLL of the gold token under the model, p_ng and the gate's rule,
    bytes and documents, and the log-linear rule's NLL as a function of α (its normalizer needs the full [S, V])."""
    t = torch.tensor([k[0] for k in kept])
    neural = torch.stack([k[1] for k in kept])
    log_png = torch.stack([k[2] for k in kept])
    gold = tokens[t][:, None]
    neural_gold, png_gold = neural.gather(1, gold)[:, 0], log_png.gather(1, gold)[:, 0]

    def loglin(alpha: float) -> np.ndarray:
        return -(neural_gold + alpha * png_gold - torch.logsumexp(neural + alpha * log_png, dim=1)).numpy()

    return dict(neural=-neural_gold.numpy(), ngram=-png_gold.numpy(), gate=-np.array([k[3] for k in kept]),
                loglin=loglin,
                bytes=nm.count_target_bytes(tokens[t - 1], tokens[t], byte_tables).numpy(),
                docs=document_ids(tokens.numpy())[t.numpy() - 1])


def compare_rules(scores: dict, resamples: int) -> dict:
    """λ and α fitted on the even-numbered samples; every rule's gain over the model on the odd-numbered ones, with
    paired bootstrap intervals over documents, and log-linear minus linear."""
    fit, held = slice(0, None, 2), slice(1, None, 2)
    lam, linear = fixed_mixture(scores["neural"], scores["ngram"], fit)
    alpha = optimize.minimize_scalar(lambda x: scores["loglin"](x)[fit].sum(), bounds=ALPHA_RANGE, method="bounded",
                                     options=dict(xatol=1e-4)).x
    rules = dict(gate=scores["gate"][held], linear=linear[held], loglin=scores["loglin"](alpha)[held])
    neural, n_bytes, docs = scores["neural"][held], scores["bytes"][held], scores["docs"][held]
    out = dict(neural_bpb=bpb(neural, n_bytes), lam=float(lam), alpha=float(alpha),
               samples=int(neural.size))
    for name, nll in rules.items():
        gain = paired_bootstrap(neural - nll, n_bytes, docs, resamples, 0)
        out[name] = (gain.delta_bpb, gain.low, gain.high)
    diff = paired_bootstrap(rules["linear"] - rules["loglin"], n_bytes, docs, resamples, 0)
    out["loglin_minus_linear"] = (diff.delta_bpb, diff.low, diff.high)
    return out


def evaluate(tg, nm, args, artifact: Path, samples: int) -> dict:
    device = torch.device("cpu")
    sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
    tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens)
    run = SimpleNamespace(args=args, rank=0, world_size=1, compile_model=False, autocast=contextlib.nullcontext,
                          val_tokens=tokens, byte_tables=tg.build_byte_tables(sp, args.vocab_size, device),
                          bos_id=int(sp.bos_id()))
    setup = tg.build_eval_setup(run, tg.model_from_artifact(args, artifact, device), args.eval_stride)
    cache = tg.eval_cache(args, device)
    drawn = torch.randperm(len(tokens) - 1, generator=torch.Generator().manual_seed(0))[:samples] + 1
    collector = collector_class(nm)(drawn.sort().values, cache, setup)
    learning = nm.LearningConfig(gate_steps=args.ngram_gate_eval_steps, gate_lr=args.ngram_gate_eval_lr)
    result = nm.evaluate_stream(setup, tg.chunk_bounds(len(tokens), args.eval_chunk_tokens), cache, learning,
                                collector)
    kept = sorted(collector.kept, key=lambda k: k[0])
    return dict(scores=score_rules(kept, tokens, run.byte_tables, nm), val_bpb=result.val_bpb)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--env", type=Path, default=REPO / "configs" / "sample_cpu.env")
    parser.add_argument("--max-tokens", type=int, default=262_144, help="VAL_MAX_TOKENS (0: the whole val)")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--resamples", type=int, default=2000)
    opts = parser.parse_args(argv)
    for name, value in read_env_file(opts.env).items():
        os.environ.setdefault(name, value)
    os.environ.update(VAL_MAX_TOKENS=str(opts.max_tokens))
    import ngram_mixer as nm
    import train_gpt as tg  # after the environment is set

    args = tg.Hyperparameters()
    if not args.ngram_orders:
        raise SystemExit("mixing_rule.py: NGRAM=0: there is no n-gram distribution to mix")
    lines = ["| artifact | neural BPB (held-out samples) | gate gain | linear gain (λ) | log-linear gain (α) | "
             "log-linear − linear |", "|---|---|---|---|---|---|"]
    for artifact in opts.artifacts:
        out = compare_rules(evaluate(tg, nm, args, artifact, opts.samples)["scores"], opts.resamples)

        def cell(key):
            value, low, high = out[key]
            return f"{value:+.4f} [{low:+.4f}, {high:+.4f}]"

        lines.append(f"| {artifact.name} | {out['neural_bpb']:.4f} ({out['samples']}) | {cell('gate')} | "
                     f"{cell('linear')} ({out['lam']:.3f}) | {cell('loglin')} ({out['alpha']:.3f}) | "
                     f"{cell('loglin_minus_linear')} |")
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    main()
