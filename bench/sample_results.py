"""Results on the bundled sample: one tiny model, scored five ways on the whole sample val shard (prints a table).

  python bench/sample_results.py            # ~20 minutes on an idle 2-core CPU

1. Trains train_gpt.py with configs/sample_cpu.env (NGRAM=1, TTT=1) on the sample train shard, scoring all
   1,040,059 sample val targets; its log gives "neural only" (the round-tripped artifact, sliding windows) and
   "+ cache + TTT" (final_ngram_ttt_exact).
2. Reloads that same artifact and re-scores it with train_gpt's own evaluation: + cache (no TTT), + TTT (no
   cache), and, for contrast, the PR #834 scheme (bench/pr834_tables.py: separate bucketed context / pair tables,
   min(pair, ctx) / ctx), which the built-in legality audit rejects. Its number is labelled INVALID: its scores
   are not a distribution, so it measures nothing.
Every pass writes its per-target dump (EVAL_DUMP format) into the work folder, so any two rows can be compared
with records/compare.py.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import ngram_mixer as nm
import train_gpt as tg  # noqa: E402
from devkit import log_fields, parse_log, read_env_file  # noqa: E402
from ngram_mixer import NgramTables  # noqa: E402
from pr834_tables import BucketedTables  # noqa: E402


def main():
    env = read_env_file(REPO / "configs" / "sample_cpu.env")
    # The whole sample val shard; no periodic val (it does not change the model, only costs minutes).
    env.update(VAL_MAX_TOKENS="0", VAL_LOSS_EVERY="0", RUN_ID="sample_results", EVAL_DUMP="cache_ttt.npz")
    workdir = Path(tempfile.mkdtemp(prefix="sample_results_"))
    print(f"training in {workdir} ...", flush=True)
    subprocess.run([sys.executable, str(REPO / "train_gpt.py")], cwd=workdir, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONUNBUFFERED="1", **env))
    log = (workdir / "logs" / "sample_results.txt").read_text()
    quant = parse_log(workdir / "logs" / "sample_results.txt").quant
    neural = log_fields(log, f"final_{quant}_roundtrip_exact")
    full = log_fields(log, "final_ngram_ttt_exact")
    audit = log_fields(log, "legality_audit")

    # The same artifact, re-scored in this process with the trainer's own run setup and evaluation.
    os.environ.update(env, RUN_ID="sample_results_rescore", EVAL_DUMP="")
    os.chdir(workdir)
    args = tg.Hyperparameters()
    run = tg.start_run(args)
    model = tg.model_from_artifact(args, workdir / "final_model.sample_results.ptz", run.device)
    setup = tg.build_eval_setup(run, model, args.eval_stride)
    bounds = tg.chunk_bounds(len(run.val_tokens), args.eval_chunk_tokens)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def rescore(name, cache, ttt_epochs, gate_steps=args.ngram_gate_eval_steps):
        print(f"re-scoring: {name} ...", flush=True)
        model.load_state_dict(initial)
        setup.ttt_trained_until = 0
        audit = None
        if cache is not None:
            audit = tg.LegalityAudit.sampled(run.val_tokens, bounds, run.bos_id, args.audit_positions, args.seed)
        record = tg.TargetRecord(len(run.val_tokens) - 1, 1 + args.ngram_experts, run.device)
        ttt = tg.LearningConfig(ttt_epochs, args.ttt_lr, args.ttt_momentum, args.ttt_cosine, args.ttt_grad_clip,
                           gate_steps, args.ngram_gate_eval_lr)
        result = nm.evaluate_stream(setup, bounds, cache, ttt, audit, record)
        nm.write_eval_dump(workdir / f"{name}.npz", record, result, setup, run.bos_id, name,
                           args.ngram_orders, args.expert_names)
        return result

    def audit_text(stats):
        return f"{max(stats[1:]):.1e}" + (" (FAILS)" if tg.audit_failures(stats) else "")

    cache_only = rescore("cache", NgramTables(args.vocab_size, (1,) + args.ngram_orders), 0)
    ttt_only = rescore("ttt", None, args.ttt_epochs)
    # PR #834 used 1,048,576 buckets per order.
    # (the gate as trained: learning from scores that are not probabilities would only add noise to the contrast)
    invalid = rescore("pr834_invalid", BucketedTables(args.vocab_size, args.ngram_orders, buckets=1 << 20), 0, 0)
    full_audit = (audit["positions"], audit["max_abs_sum_err"], audit["max_gold_logp_err"],
                  audit["max_rescore_logp_delta"])
    rows = [(f"neural only (round-tripped {quant} artifact, sliding windows)", neural["val_loss"],
             neural["val_bpb"], "-"),
            ("+ TTT (no cache)", ttt_only.val_loss, ttt_only.val_bpb, "-"),
            ("+ cache (no TTT)", cache_only.val_loss, cache_only.val_bpb, audit_text(cache_only.audit)),
            ("+ cache + TTT (final_ngram_ttt_exact)", full["val_loss"], full["val_bpb"], audit_text(full_audit)),
            ("INVALID: PR #834-style bucketed min(pair, ctx)/ctx, + cache", invalid.val_loss, invalid.val_bpb,
             audit_text(invalid.audit))]
    train_s = log_fields(log, f"step:{args.iterations}/{args.iterations} train")["train_time"] / 1000
    print(f"\nsample val: {cache_only.scored_tokens} targets, {cache_only.scored_bytes} bytes; train {train_s:.0f} s, "
          f"{args.iterations} steps; audit over {cache_only.audit[0]} positions; dumps in {workdir}\n")
    print("| scoring | val_loss (nats) | val_bpb | legality audit max error |")
    print("|---|---|---|---|")
    for name, loss, bpb, err in rows:
        print(f"| {name} | {loss:.4f} | {bpb:.4f} | {err} |")


if __name__ == "__main__":
    main()
