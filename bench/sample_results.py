"""Results on the bundled sample: one tiny model, scored five ways on the whole sample val shard (prints a table).

  python bench/sample_results.py            # ~10-15 minutes on 2 CPU cores

1. Trains train_gpt.py with configs/sample_cpu.env (NGRAM=1, TTT=1) on the sample train shard, scoring all
   1,040,059 sample val targets; its log gives "neural only" (the round-tripped artifact, sliding windows) and
   "+ cache + TTT" (final_ngram_ttt_exact).
2. Reloads that same artifact and re-scores it with train_gpt's own evaluation: + cache (no TTT), + TTT (no
   cache), and, for contrast, the PR #834 scheme (BucketedTables: separate bucketed context / pair tables,
   min(pair, ctx) / ctx), which the built-in legality audit rejects. Its number is labelled INVALID: its scores
   are not a distribution, so it measures nothing.
"""
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ngram_mixer import BucketedTables, NgramTables  # noqa: E402


def read_env_file(path: Path, data_dir: Path) -> dict:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value.replace("${SAMPLE_DATA_DIR:-../shared/data}", str(data_dir))
    return env


def log_line(log: str, prefix: str) -> dict:
    line = [ln for ln in log.splitlines() if ln.startswith(prefix)][-1]
    return {k: float(v.removesuffix("ms")) for k, v in (f.split(":", 1) for f in line.split()[1:] if ":" in f)}


def main():
    data_dir = Path(os.environ.get("SAMPLE_DATA_DIR", REPO.parent / "shared" / "data")).resolve()
    env = dict(os.environ, **read_env_file(REPO / "configs" / "sample_cpu.env", data_dir))
    # The whole sample val shard; no periodic val (it does not change the model, only costs minutes).
    env.update(VAL_MAX_TOKENS="0", VAL_LOSS_EVERY="0", RUN_ID="sample_results", PYTHONUNBUFFERED="1")
    workdir = Path(tempfile.mkdtemp(prefix="sample_results_"))
    print(f"training in {workdir} ...", flush=True)
    subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=workdir, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    log = (workdir / "logs" / "sample_results.txt").read_text()
    quant = next(ln for ln in log.splitlines() if ln.startswith("Serialized model ")).split()[2].rstrip(":")
    neural = log_line(log, f"final_{quant}_roundtrip_exact")
    full = log_line(log, "final_ngram_ttt_exact")
    audit = log_line(log, "legality_audit")

    # The same artifact, re-scored in this process with the trainer's own functions and settings; train_gpt reads
    # its hyperparameters from the environment when imported, so it is imported only now.
    os.environ.update(env)
    tg = importlib.import_module("train_gpt")
    args = tg.Hyperparameters()
    device = torch.device("cpu")
    model = tg.model_from_artifact(args, workdir / "final_model.sample_results.ptz", device)
    tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, 0)
    luts = tg.build_byte_luts(tg.load_tokenizer(args.tokenizer_path, args.vocab_size), args.vocab_size, device)
    windows = max(1, args.val_batch_size // args.train_seq_len)
    setup = tg.EvalSetup(model, model.hidden, tokens, luts, args.train_seq_len, args.eval_stride, windows, 0, 1,
                         args.ngram_min_count)
    bounds = tg.chunk_bounds(len(tokens), args.eval_chunk_tokens)
    orders = tg.ngram_orders(args)
    audit_at = tg.sample_audit_positions(len(tokens), args.audit_positions, args.seed, device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def rescore(cache, ttt_epochs):
        model.load_state_dict(initial)
        print(f"re-scoring with {type(cache).__name__ if cache else 'no cache'}, TTT epochs {ttt_epochs} ...",
              flush=True)
        return tg.eval_ngram_ttt(setup, bounds, cache, ttt_epochs, args.ttt_lr, args.ttt_momentum, audit_at)

    cache_only = rescore(NgramTables(args.vocab_size, orders), 0)
    ttt_only = rescore(None, args.ttt_epochs)
    # PR #834 used 1,048,576 buckets per order.
    invalid = rescore(BucketedTables(args.vocab_size, orders, buckets=1 << 20), 0)

    rows = [(f"neural only (round-tripped {quant} artifact, sliding windows)", neural["val_loss"],
             neural["val_bpb"], "-"),
            ("+ TTT (no cache)", ttt_only.val_loss, ttt_only.val_bpb, "-"),
            ("+ cache (no TTT)", cache_only.val_loss, cache_only.val_bpb,
             f"{max(cache_only.audit_sum_err, cache_only.audit_gold_err):.1e}"),
            ("+ cache + TTT (final_ngram_ttt_exact)", full["val_loss"], full["val_bpb"],
             f"{max(audit['max_abs_sum_err'], audit['max_gold_err']):.1e}"),
            ("INVALID: PR #834-style bucketed min(pair, ctx)/ctx, + cache", invalid.val_loss, invalid.val_bpb,
             f"{max(invalid.audit_sum_err, invalid.audit_gold_err):.1e} (FAILS)")]
    print(f"\nsample val: {cache_only.scored_tokens} targets, {cache_only.scored_bytes} bytes; train "
          f"{log_line(log, 'step:' + str(args.iterations) + '/')['train_time'] / 1000:.0f} s, "
          f"{args.iterations} steps; audit over {cache_only.audit_positions} positions\n")
    print("| scoring | val_loss (nats) | val_bpb | legality audit max error |")
    print("|---|---|---|---|")
    for name, loss, bpb, err in rows:
        print(f"| {name} | {loss:.4f} | {bpb:.4f} | {err} |")


if __name__ == "__main__":
    main()
