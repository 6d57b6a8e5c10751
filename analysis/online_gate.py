"""Would a gate that keeps learning at evaluation (score first, then learn from the scored chunk) beat the gate as
trained? A replay of train_gpt's cache evaluation (no TTT) on one artifact.

  python analysis/online_gate.py ARTIFACT [--env configs/sample_cpu.env] [--max-tokens 0]

One pass over the val stream in EVAL_CHUNK_TOKENS chunks, exactly as evaluate_stream scores them without TTT (the
model's sliding windows, the causal cache with within-chunk counts), keeps for every target its final hidden
state, the neural log-probability of the target and the experts' inputs. Then, for each setting (Adam steps per
chunk, learning rate), a copy of the artifact's gate scores chunk i and only then takes its steps on chunk i's
mixture NLL, so every score comes from a gate that has seen only earlier chunks: the same score-then-update order
as TTT, through the run's own ngram_mixer.OnlineGate. Prints BPB per setting and the paired bootstrap (documents)
against the artifact's own gate.
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ngram_mixer as nm  # noqa: E402
from devkit import read_env_file  # noqa: E402
from records.compare import bpb, document_ids, paired_bootstrap  # noqa: E402

SETTINGS = "1:0.001,1:0.004,4:0.004,4:0.01,16:0.01"  # Adam steps per chunk : learning rate, comma-separated


@torch.no_grad()
def replay(tg, args, artifact: Path) -> dict:
    """Per chunk: positions, hidden states, neural log-prob of the target, expert probs / valid / features."""
    device = torch.device("cpu")
    model = tg.model_from_artifact(args, artifact, device).eval()
    tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens)
    sp = tg.load_tokenizer(args.tokenizer_path, args.vocab_size)
    byte_tables = tg.build_byte_tables(sp, args.vocab_size, device)
    setup = tg.EvalSetup(model, model.hidden, tokens, byte_tables, args.train_seq_len, args.eval_stride,
                         max(1, args.val_batch_size // args.train_seq_len), 0, 1, args.ngram_min_count,
                         ngram_discount=args.ngram_discount, document=args.document_cache(sp.bos_id()))
    cache = tg.NgramTables(args.vocab_size, (1,) + args.ngram_orders)
    chunks = []
    bounds = tg.chunk_bounds(len(tokens), args.eval_chunk_tokens)
    for first, end in zip(bounds[:-1], bounds[1:]):
        parts = []
        for window in zip(*(w.split(setup.windows_per_batch) for w in nm.window_schedule(
                first, end, setup.seq_len, setup.stride))):
            positions, h, log_probs = nm.forward_windows(setup, tokens, *window)
            neural_lp = log_probs.gather(1, tokens[positions][:, None]).squeeze(1)
            probs, valid, features = nm.expert_inputs(cache, tokens, positions, setup.min_count,
                                                      discount=setup.ngram_discount, document=setup.document)
            parts.append((positions, h, neural_lp, probs, valid, features))
        chunks.append([torch.cat([p[i] for p in parts], dim=1 if i in (3, 4) else 0) for i in range(6)])
        cache.extend(tokens[cache.num_tokens:end])
    return dict(model=model, tokens=tokens, byte_tables=byte_tables, chunks=chunks)


def mixture_nll(tg, model, chunk) -> torch.Tensor:
    _, h, neural_lp, probs, valid, features = chunk
    weights = tg.mixture_weights(model.gate_logits(h, features), valid, model.neural_floor)
    return -tg.mixture_logprob(neural_lp, probs, valid, weights).double()


def online(tg, model, chunks, steps: int, lr: float) -> torch.Tensor:
    """Score chunk i with the gate as it is, then let train_gpt's OnlineGate take its steps on chunk i; [N-1] NLL
    in target order."""
    model = copy.deepcopy(model)
    gate = nm.OnlineGate(model.gate_parameters(), steps, lr)
    nll = []
    for chunk in chunks:
        with torch.no_grad():
            nll.append(mixture_nll(tg, model, chunk))
        gate.remember(*chunk)
        gate.learn(model.gate_logits, model.neural_floor)
    return torch.cat(nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--env", type=Path, default=REPO / "configs" / "sample_cpu.env")
    parser.add_argument("--max-tokens", type=int, default=0, help="VAL_MAX_TOKENS (0 = the whole val stream)")
    parser.add_argument("--settings", default=SETTINGS, help=f"steps:lr pairs (default {SETTINGS})")
    opts = parser.parse_args()
    os.environ.update(read_env_file(opts.env), VAL_MAX_TOKENS=str(opts.max_tokens))
    import ngram_mixer as nm
    import train_gpt as tg  # after the environment is set

    args = tg.Hyperparameters()
    data = replay(tg, args, opts.artifact)
    tokens, chunks = data["tokens"], data["chunks"]
    positions = torch.cat([c[0] for c in chunks])
    if not torch.equal(positions, torch.arange(1, len(tokens))):
        raise RuntimeError("the replay did not score every target once, in order")
    n_bytes = nm.count_target_bytes(tokens[:-1], tokens[1:], data["byte_tables"]).double().numpy()
    docs = document_ids(tokens.numpy())
    with torch.no_grad():
        own = torch.cat([mixture_nll(tg, data["model"], c) for c in chunks]).numpy()
    neural = -torch.cat([c[2] for c in chunks]).double().numpy()

    print(f"{opts.artifact}: {len(tokens) - 1:,} targets; neural {bpb(neural, n_bytes):.4f}, "
          f"own gate {bpb(own, n_bytes):.4f}")
    for steps, lr in (item.split(":") for item in opts.settings.split(",")):
        steps, lr = int(steps), float(lr)
        nll = online(tg, data["model"], chunks, steps, lr).numpy()
        diff = paired_bootstrap(nll - own, n_bytes, docs, resamples=2000)
        print(f"online gate, {steps} Adam steps of lr {lr} per chunk: {bpb(nll, n_bytes):.4f}  "
              f"- own gate {diff.delta_bpb:+.4f} [{diff.low:+.4f}, {diff.high:+.4f}]", flush=True)


if __name__ == "__main__":
    main()
