"""Quantization + compression on one float checkpoint: roundtrip BPB and artifact bytes, one table (prints it).

  python bench/quant_bench.py sample --checkpoint /tmp/qb/sample.pt     # trains it first if the file is missing
  python bench/quant_bench.py full-shapes                               # the default 11 x 512, vocab 8192 model

sample: configs/sample_cpu.env (the tiny stack on the sp1024 sample; NGRAM=0, the gate is not quantized anyway).
The checkpoint is the EMA weights after ITERATIONS steps of the trainer's own model, optimizers and schedule,
saved before any quantization. Each scheme (int8 RTN, int6 RTN, int6 GPTQ + SDClip) is quantized once, compressed
with each compressor (the stored bytes: header + byte-shuffled blob), reloaded from the zstd file and scored on the
first --val-tokens sample val tokens with the config's sliding windows. GPTQ calibrates on the train shard only.

full-shapes: the default config's exact shapes on CPU. Weights are not trained (no GPU here): every matrix and the
embedding are N(0, 1/sqrt(fan_in)) and N(0, 0.005) Gaussians, the other tensors as initialized, GPTQ calibrates
on random token ids. Per-row SDClip makes the bytes independent of each row's scale, not of its shape: trained
weights have heavier tails than a Gaussian, so treat these bytes as an estimate. Code bytes are train_gpt.py +
ngram_mixer.py as they are on disk.
"""
import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devkit import read_env_file  # noqa: E402

SCHEMES = {  # name -> (matrix bits, GPTQ, matrix clip k, embedding bits, embedding clip k, LQER rank, LQER top k)
    "int8 RTN, abs-max rows": (8, False, 0.0, 8, 0.0, 0, 0),
    "int6 RTN, abs-max rows (emb int8)": (6, False, 0.0, 8, 0.0, 0, 0),
    "int6 RTN + SDClip k=12.85 (emb int8, k=20)": (6, False, 12.85, 8, 20.0, 0, 0),
    "int6 GPTQ + SDClip k=12.85 (emb int8, k=20)": (6, True, 12.85, 8, 20.0, 0, 0),
    # LQER rank-4 corrections on the 3 matrices they serve best (PR #1797), fp16 factors
    "int6 GPTQ + SDClip + LQER r4 top3 (emb int8)": (6, True, 12.85, 8, 20.0, 4, 3),
    # int7 embeddings, as in the 1.0611 record (PR #1855)
    "int6 GPTQ + SDClip k=12.85 (emb int7, k=20)": (6, True, 12.85, 7, 20.0, 0, 0),
    "int6 GPTQ + SDClip + LQER r4 top3 (emb int7)": (6, True, 12.85, 7, 20.0, 4, 3),
}
DEFAULT_SCHEME = "int6 GPTQ + SDClip + LQER r4 top3 (emb int7)"  # train_gpt.py's defaults
# The sample model's block matrices (at most 256 x 128) are below the trainer's 65,536-element threshold and would
# all stay fp16; the sample mode lowers it so every block matrix is quantized, as in the full-size model.
SAMPLE_QUANT_MIN_NUMEL = 8192


def train_checkpoint(tg, args, path: Path) -> None:
    """The trainer's train step without the mixer (main() minus logging, DDP and the wallclock)."""
    torch.manual_seed(args.seed)
    model = tg.GPT(args)
    optimizers, ema = tg.build_optimizers(args, model), tg.EMA(model, args.ema_decay)
    local_tokens = args.train_batch_tokens // tg.MICRO_BATCHES_PER_STEP
    loader = tg.DistributedTokenLoader(tg.list_shards(args.data_path, "train"), 0, 1, torch.device("cpu"),
                                       args.vocab_size, local_tokens)
    t0 = time.perf_counter()
    for step in range(args.iterations):
        model.set_recurrence(tg.training_progress(args, step, 0.0) >= args.enable_looping_at)
        segment, _ = loader.next_step()
        for start in loader.span_starts:
            local = segment[start:start + loader.span]
            loss, _, _ = model(local[:-1].reshape(-1, args.train_seq_len), local[1:].reshape(-1, args.train_seq_len))
            (loss / len(loader.span_starts)).backward()
        frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
        for group in optimizers[1].param_groups:
            group["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * tg.lr_scale(args, step, 0.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ema.update(model)
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1}/{args.iterations} train_loss {loss.item():.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ema.state_dict(model), path)


def table(rows, header):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def measure(tg, state, hessians, score, workdir: Path, schemes):
    """Rows of [scheme, BPB or '-', quantize time, bytes per compressor...]."""
    rows = []
    for name in schemes:
        bits, gptq, clip, embed_bits, embed_clip, lqer_rank, lqer_top_k = SCHEMES[name]
        t0 = time.perf_counter()
        blob = tg.quantize_state_dict(state, bits, hessians if gptq else None, clip, embed_bits, embed_clip,
                                      lqer_rank, lqer_top_k)
        quant_s = time.perf_counter() - t0
        sizes = []
        for compressor in tg.COMPRESSORS:
            t0 = time.perf_counter()
            data = tg.compress_artifact(blob, compressor)
            sizes.append(f"{len(data):,} ({time.perf_counter() - t0:.0f}s)")
            (workdir / f"{compressor}.ptz").write_bytes(data)
        bpb = score(workdir / "zstd.ptz") if score else "-"
        rows.append([name, bpb if isinstance(bpb, str) else f"{bpb:.4f}", f"{quant_s:.0f}s", *sizes])
        print(f"  {rows[-1]}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("sample", "full-shapes"))
    parser.add_argument("--checkpoint", type=Path, default=Path("quant_bench_sample.pt"))
    parser.add_argument("--val-tokens", type=int, default=131072, help="score the first N sample val tokens")
    parser.add_argument("--steps", type=int, default=None, help="train steps for a missing checkpoint (default: the "
                        "config's ITERATIONS; the schedule scales with it)")
    parser.add_argument("--calib-batches", type=int, default=None,
                        help="GPTQ calibration batches (default: the sample config's 8 x 1,024 tokens; full-shapes: "
                             "4 x 2 random sequences, a CPU-sized stand-in)")
    parser.add_argument("--schemes", default=None, help="comma-separated SCHEMES keys' prefixes (default: all for "
                        "sample; for full-shapes DEFAULT_SCHEME, train_gpt.py's defaults)")
    parser.add_argument("--workdir", type=Path, default=Path("quant_bench_out"))
    opts = parser.parse_args()
    env = read_env_file(REPO / "configs" / "sample_cpu.env") if opts.mode == "sample" else {}
    # The sample's tokens are sp1024; the default config's shapes only need a tokenizer-free path.
    env.update(NGRAM="0", VAL_MAX_TOKENS=str(opts.val_tokens))
    if opts.steps is not None:
        env.update(ITERATIONS=str(opts.steps))
    os.environ.update(env)
    tg = importlib.import_module("train_gpt")  # after the environment is set, as a run sees it
    args = tg.Hyperparameters()
    device = torch.device("cpu")
    opts.workdir.mkdir(parents=True, exist_ok=True)
    default_calib = args.gptq_calib_batches if opts.mode == "sample" else 4
    calib_batches = opts.calib_batches if opts.calib_batches is not None else default_calib
    prefixes = opts.schemes.split(",") if opts.schemes else (["int"] if opts.mode == "sample" else [DEFAULT_SCHEME])
    schemes = [name for name in SCHEMES if any(name.startswith(p) for p in prefixes)]
    if opts.mode == "sample":
        if not opts.checkpoint.is_file():
            print(f"training {args.iterations} steps of configs/sample_cpu.env -> {opts.checkpoint}", flush=True)
            train_checkpoint(tg, args, opts.checkpoint)
        tg.QUANT_MIN_NUMEL = SAMPLE_QUANT_MIN_NUMEL
        state = torch.load(opts.checkpoint, map_location="cpu", weights_only=True)
        model = tg.GPT(args).to(device)
        model.load_state_dict(state)
        model.set_recurrence(True)
        args.gptq_calib_batches = calib_batches
        hessians = tg.collect_hessians(model, tg.calibration_batches(args, 0, 1, device))
        tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, opts.val_tokens)
        byte_tables = tg.build_byte_tables(tg.load_tokenizer(args.tokenizer_path, args.vocab_size), args.vocab_size, device)

        def score(path):
            m = tg.model_from_artifact(args, path, device) if path else model
            setup = tg.EvalSetup(m, m.hidden, tokens, byte_tables, args.train_seq_len, args.eval_stride,
                                 max(1, args.val_batch_size // args.train_seq_len), 0, 1)
            return tg.eval_val(setup).val_bpb

        print(f"float checkpoint val_bpb {score(None):.4f} on the first {len(tokens):,} sample val tokens "
              f"(stride {args.eval_stride}, seq {args.train_seq_len})", flush=True)
    else:
        torch.manual_seed(0)
        model = tg.GPT(args).to(device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    std = args.tied_embed_init_std if name == "tok_emb.weight" else p.size(1) ** -0.5
                    p.normal_(0.0, std)
        model.set_recurrence(True)
        state = model.state_dict()
        batches = [torch.randint(0, args.vocab_size, (2, args.train_seq_len)) for _ in range(calib_batches)]
        hessians = tg.collect_hessians(model, batches)
        score = None
    n_params = sum(p.numel() for p in model.parameters())
    code_bytes = sum((REPO / f).stat().st_size for f in ("train_gpt.py", "ngram_mixer.py"))
    print(f"mode {opts.mode}: {n_params:,} parameters (n-gram gate excluded), code {code_bytes:,} bytes, "
          f"GPTQ calibration {calib_batches} batches", flush=True)
    rows = measure(tg, state, hessians, score, opts.workdir, schemes)
    table(rows, ["scheme", "roundtrip val_bpb", "quantize time", *(f"bytes {c}" for c in tg.COMPRESSORS)])


if __name__ == "__main__":
    main()
