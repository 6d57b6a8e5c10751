"""
train_gpt.py: a single-file trainer for the OpenAI "parameter golf" challenge, with a *valid* n-gram mixer.

One run trains a small GPT (<= 10 min on 8xH100) together with a gate that mixes it with exact, normalized
n-gram experts (ngram_mixer.py), quantizes and zstd-compresses the model into a <= 16,000,000-byte artifact,
reloads that artifact and scores FineWeb validation in bits per byte, twice:
  final_<quant>_roundtrip_exact   the reloaded model alone, sliding-window eval
  final_ngram_ttt_exact           + a causal n-gram cache and test-time training, score-then-update

  torchrun --standalone --nproc_per_node=8 train_gpt.py                  # competition run (8xH100)
  set -a; . configs/sample_cpu.env; set +a; python train_gpt.py           # tiny CPU run on the bundled sample

Every knob is an environment variable (class Hyperparameters). Validity rules: ../shared/DESIGN.md section 4.
Hard cap: 1500 lines.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import lzma
import math
import os
import random
import re
import resource
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
import zstandard
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ngram_mixer
from ngram_mixer import NgramTables, mixture_distribution, mixture_logprob_from_neural

# -----------------------------
# HYPERPARAMETERS
# -----------------------------
# Defaults are the SP8192 record stack (PR #1493: 11 layers x 512, MLP 4x LeakyReLU(0.5)^2, partial RoPE, depth
# recurrence, parallel residuals, XSA, MuonEq-R, EMA, GPTQ int6 + SDClip) plus the n-gram mixer and its evaluation.
# configs/baseline_2024.env restores the March challenge baseline (9 x 512, vocab 1024, int8 per-row + zstd).


class Hyperparameters:
    # Data and run identity.
    data_path = os.environ.get("DATA_PATH", "./data/datasets/fineweb10B_sp8192")
    tokenizer_path = os.environ.get("TOKENIZER_PATH", "./data/tokenizers/fineweb_8192_bpe.model")
    run_id = os.environ.get("RUN_ID", "")
    seed = int(os.environ.get("SEED", 1337))

    # Training length and batch.
    iterations = int(os.environ.get("ITERATIONS", 20000))
    max_wallclock_seconds = float(os.environ.get("MAX_WALLCLOCK_SECONDS", 600.0))
    warmup_steps = int(os.environ.get("WARMUP_STEPS", 20))
    # Linear LR warmdown, either over the last WARMDOWN_ITERS steps (the baseline) or over the last WARMDOWN_FRAC of
    # the run's progress, wallclock or steps (the records); at most one of them may be set.
    warmdown_iters = int(os.environ.get("WARMDOWN_ITERS", 0))
    warmdown_frac = float(os.environ.get("WARMDOWN_FRAC", 0.72))
    train_batch_tokens = int(os.environ.get("TRAIN_BATCH_TOKENS", 524_288))
    train_seq_len = int(os.environ.get("TRAIN_SEQ_LEN", 1024))
    train_log_every = int(os.environ.get("TRAIN_LOG_EVERY", 200))
    val_loss_every = int(os.environ.get("VAL_LOSS_EVERY", 1000))
    val_batch_size = int(os.environ.get("VAL_BATCH_SIZE", 524_288))
    val_max_tokens = int(os.environ.get("VAL_MAX_TOKENS", 0))
    compile = bool(int(os.environ.get("COMPILE", 1)))

    # Model shape.
    vocab_size = int(os.environ.get("VOCAB_SIZE", 8192))
    num_layers = int(os.environ.get("NUM_LAYERS", 11))
    model_dim = int(os.environ.get("MODEL_DIM", 512))
    num_heads = int(os.environ.get("NUM_HEADS", 8))
    num_kv_heads = int(os.environ.get("NUM_KV_HEADS", 4))
    mlp_mult = int(os.environ.get("MLP_MULT", 4))
    rope_base = float(os.environ.get("ROPE_BASE", 10000.0))
    logit_softcap = float(os.environ.get("LOGIT_SOFTCAP", 30.0))
    qk_gain_init = float(os.environ.get("QK_GAIN_INIT", 5.25))
    tied_embed_init_std = float(os.environ.get("TIED_EMBED_INIT_STD", 0.005))

    # Model stack (0 / -1 switch each part off; all off = the baseline's block).
    mlp_negative_slope = float(os.environ.get("MLP_NEGATIVE_SLOPE", 0.5))  # LeakyReLU(slope)^2; 0 = relu^2
    rope_dims = int(os.environ.get("ROPE_DIMS", 16))  # rotate only the first ROPE_DIMS of each head; 0 = all
    ln_scale = bool(int(os.environ.get("LN_SCALE", 1)))  # block inputs scaled by 1/sqrt(layer + 1)
    skip_gates = bool(int(os.environ.get("SKIP_GATES", 1)))  # sigmoid-gated U-net skips instead of additive
    parallel_residual_start = int(os.environ.get("PARALLEL_RESIDUAL_START", 7))  # first parallel block; -1 = none
    xsa_last_n = int(os.environ.get("XSA_LAST_N", 11))  # exclusive self-attention in the last N blocks
    num_loops = int(os.environ.get("NUM_LOOPS", 2))  # extra passes over blocks LOOP_START..LOOP_END
    loop_start = int(os.environ.get("LOOP_START", 3))
    loop_end = int(os.environ.get("LOOP_END", 5))
    enable_looping_at = float(os.environ.get("ENABLE_LOOPING_AT", 0.35))  # fraction of the run before looping

    # Optimizer: Muon for block matrices, Adam for the embedding, scalars and the gate.
    tied_embed_lr = float(os.environ.get("TIED_EMBED_LR", 0.05))
    matrix_lr = float(os.environ.get("MATRIX_LR", 0.022))
    scalar_lr = float(os.environ.get("SCALAR_LR", 0.04))
    muon_momentum = float(os.environ.get("MUON_MOMENTUM", 0.95))
    muon_momentum_warmup_start = float(os.environ.get("MUON_MOMENTUM_WARMUP_START", 0.85))
    muon_momentum_warmup_steps = int(os.environ.get("MUON_MOMENTUM_WARMUP_STEPS", 500))
    muon_backend_steps = int(os.environ.get("MUON_BACKEND_STEPS", 5))
    muon_row_normalize = bool(int(os.environ.get("MUON_ROW_NORMALIZE", 1)))  # MuonEq-R
    muon_polar_express = bool(int(os.environ.get("MUON_POLAR_EXPRESS", 0)))
    muon_wd = float(os.environ.get("MUON_WD", 0.095))
    embed_wd = float(os.environ.get("EMBED_WD", 0.095))
    ema_decay = float(os.environ.get("EMA_DECAY", 0.9965))  # exported weights; 0 = export the raw weights
    beta1 = float(os.environ.get("BETA1", 0.9))
    beta2 = float(os.environ.get("BETA2", 0.95))
    adam_eps = float(os.environ.get("ADAM_EPS", 1e-8))
    grad_clip_norm = float(os.environ.get("GRAD_CLIP_NORM", 0.0))

    # N-gram mixer: frozen tables from training tokens during training, a score-then-update cache at eval.
    ngram = bool(int(os.environ.get("NGRAM", 1)))
    ngram_max_order = int(os.environ.get("NGRAM_MAX_ORDER", 7))
    ngram_prefill_tokens = int(os.environ.get("NGRAM_PREFILL_TOKENS", 23_000_000))
    ngram_min_count = int(os.environ.get("NGRAM_MIN_COUNT", 2))
    ngram_neural_floor = float(os.environ.get("NGRAM_NEURAL_FLOOR", 0.05))
    ngram_loss_weight = float(os.environ.get("NGRAM_LOSS_WEIGHT", 0.1))
    ngram_gate_lr = float(os.environ.get("NGRAM_GATE_LR", 0.004))

    # Quantization + compression: per-row int matrices (embedding EMBED_BITS), GPTQ on training tokens, SDClip.
    quant_bits = int(os.environ.get("QUANT_BITS", 6))
    embed_bits = int(os.environ.get("EMBED_BITS", 8))
    gptq_calib_batches = int(os.environ.get("GPTQ_CALIB_BATCHES", 64))  # of TRAIN_BATCH_TOKENS / 8; 0 = RTN
    matrix_clip_sigmas = float(os.environ.get("MATRIX_CLIP_SIGMAS", 12.85))  # SDClip k; 0 = clip at abs max
    embed_clip_sigmas = float(os.environ.get("EMBED_CLIP_SIGMAS", 20.0))
    compressor = os.environ.get("COMPRESSOR", "best")  # zstd, lzma, brotli, or best (smallest of the three)

    # Evaluation, test-time training.
    eval_stride = int(os.environ.get("EVAL_STRIDE", 64))
    eval_chunk_tokens = int(os.environ.get("EVAL_CHUNK_TOKENS", 32768))
    eval_artifact = os.environ.get("EVAL_ARTIFACT", "")
    ttt = bool(int(os.environ.get("TTT", 1)))
    ttt_epochs = int(os.environ.get("TTT_EPOCHS", 3))
    ttt_lr = float(os.environ.get("TTT_LR", 0.002))
    ttt_momentum = float(os.environ.get("TTT_MOMENTUM", 0.9))
    audit_positions = int(os.environ.get("AUDIT_POSITIONS", 256))


# The micro-batches of one optimizer step, summed over all processes. Keeping this fixed makes the global batch,
# and so the losses, independent of how many processes share the work (as in the challenge baseline).
MICRO_BATCHES_PER_STEP = 8
ARTIFACT_CAP_BYTES = 16_000_000


def validate_hyperparameters(args: Hyperparameters, world_size: int) -> None:
    """Reject settings that would silently train or score something else; each message names the env var."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(MICRO_BATCHES_PER_STEP % world_size == 0,
         f"WORLD_SIZE={world_size} must divide {MICRO_BATCHES_PER_STEP} (micro-batches per step)")
    need(args.train_batch_tokens % (MICRO_BATCHES_PER_STEP * args.train_seq_len) == 0,
         f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be a multiple of "
         f"{MICRO_BATCHES_PER_STEP} x TRAIN_SEQ_LEN={args.train_seq_len}")
    need(1 <= args.eval_stride <= args.train_seq_len,
         f"EVAL_STRIDE={args.eval_stride} must be in [1, TRAIN_SEQ_LEN={args.train_seq_len}]")
    need(args.eval_chunk_tokens >= 1, f"EVAL_CHUNK_TOKENS={args.eval_chunk_tokens} must be >= 1")
    need(2 <= args.quant_bits <= 8, f"QUANT_BITS={args.quant_bits} must be in [2, 8]")
    need(2 <= args.embed_bits <= 8, f"EMBED_BITS={args.embed_bits} must be in [2, 8]")
    need(args.compressor in COMPRESSORS + ("best",), f"COMPRESSOR={args.compressor} must be one of "
         f"{', '.join(COMPRESSORS)}, best")
    need(args.gptq_calib_batches >= 0, f"GPTQ_CALIB_BATCHES={args.gptq_calib_batches} must be >= 0")
    need(not (args.warmdown_iters > 0 and args.warmdown_frac > 0),
         f"set only one of WARMDOWN_ITERS={args.warmdown_iters} and WARMDOWN_FRAC={args.warmdown_frac}")
    need(0 <= args.warmdown_frac <= 1, f"WARMDOWN_FRAC={args.warmdown_frac} must be in [0, 1]")
    need(0 <= args.ema_decay < 1, f"EMA_DECAY={args.ema_decay} must be in [0, 1)")
    need(args.muon_backend_steps <= len(POLAR_EXPRESS_COEFFS) or not args.muon_polar_express,
         f"MUON_BACKEND_STEPS={args.muon_backend_steps} must be <= 5 with MUON_POLAR_EXPRESS=1")
    need(args.num_loops == 0 or 0 <= args.loop_start <= args.loop_end < args.num_layers,
         f"LOOP_START={args.loop_start}..LOOP_END={args.loop_end} must be blocks of NUM_LAYERS={args.num_layers}")
    head_dim = args.model_dim // args.num_heads
    need(args.rope_dims % 2 == 0 and 0 <= args.rope_dims <= head_dim,
         f"ROPE_DIMS={args.rope_dims} must be even and at most the head dim {head_dim}")
    need(args.model_dim % args.num_heads == 0 and (args.model_dim // args.num_heads) % 2 == 0,
         f"MODEL_DIM={args.model_dim} / NUM_HEADS={args.num_heads} must be an even head dim (RoPE)")
    need(args.num_heads % args.num_kv_heads == 0,
         f"NUM_HEADS={args.num_heads} must be a multiple of NUM_KV_HEADS={args.num_kv_heads}")
    need(args.ngram_max_order >= 2, f"NGRAM_MAX_ORDER={args.ngram_max_order} must be >= 2")
    need(0.0 <= args.ngram_neural_floor <= 1.0, f"NGRAM_NEURAL_FLOOR={args.ngram_neural_floor} must be in [0, 1]")
    need(args.logit_softcap > 0, f"LOGIT_SOFTCAP={args.logit_softcap} must be positive")
    need(args.iterations >= 0 and args.warmup_steps >= 0, "ITERATIONS and WARMUP_STEPS must be >= 0")


def ngram_orders(args: Hyperparameters) -> tuple[int, ...]:
    return tuple(range(2, args.ngram_max_order + 1)) if args.ngram else ()


# -----------------------------
# MUON
# -----------------------------
# Orthogonalized momentum for 2-D weights, from modded-nanogpt (https://kellerjordan.github.io/posts/muon/).


# Polar Express (arXiv 2505.16932): one tuned quintic per step, as in modded-nanogpt; at most 5 steps.
POLAR_EXPRESS_COEFFS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def zeropower_via_newtonschulz5(grad: Tensor, steps: int, eps: float = 1e-7, polar_express: bool = False) -> Tensor:
    # Quintic Newton-Schulz iteration whose coefficients push all singular values towards 1 in a few steps;
    # bf16 is accurate enough for that on GPU, the CPU keeps fp32 (its bf16 matmuls are slow).
    x = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    # Polar Express's coefficients assume singular values <= 1 with a 2% safety margin.
    x = x / (x.norm() * 1.02 + eps) if polar_express else x / (x.norm() + eps)
    transposed = grad.size(0) > grad.size(1)
    if transposed:
        x = x.T
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps] if polar_express else [(3.4445, -4.7750, 2.0315)] * steps:
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalized. Parameters are dealt round-robin to ranks; each
    rank orthogonalizes its share and one all-reduce of a flat buffer gives every rank every update.
    row_normalize: MuonEq-R (PR #1493), each row of the momentum scaled to unit norm before Newton-Schulz.
    weight_decay: decoupled, p *= 1 - lr * wd (PR #1493)."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, row_normalize: bool = False,
                 polar_express: bool = False, weight_decay: float = 0.0, compile: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                                      row_normalize=row_normalize, polar_express=polar_express))
        # Compiled, the iteration's small elementwise ops fuse (the challenge baseline compiles it too).
        self.orthogonalize = torch.compile(zeropower_via_newtonschulz5) if compile else zeropower_via_newtonschulz5

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            # The GPU's Newton-Schulz output is bf16 already: a bf16 buffer halves the all-reduce at no cost.
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device,
                                  dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = p.grad.add(buf, alpha=group["momentum"])
                    if group["row_normalize"]:
                        update = update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(update.dtype)
                    update = self.orthogonalize(update, group["backend_steps"], polar_express=group["polar_express"])
                    # Rectangular matrices get a larger step so their RMS update matches square ones.
                    update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    updates[offset:offset + p.numel()] = update.reshape(-1).to(updates.dtype)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(updates[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(args: Hyperparameters, model: GPT) -> list[torch.optim.Optimizer]:
    """[AdamW (embedding, scalars, gate), Muon (block matrices)]; every group remembers its base_lr.
    Norm gains, residual mixes and skip weights are not decayed: shrinking them changes the function, not a scale."""
    fused = next(model.parameters()).is_cuda
    matrix_params = [m.weight for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    matrix_ids = {id(p) for p in matrix_params}
    scalar_params = [p for p in model.blocks.parameters() if id(p) not in matrix_ids] + [model.skip_weights]
    scalar_params += [model.skip_gates] if model.skip_gates is not None else []
    adam_groups = [dict(params=[model.tok_emb.weight], lr=args.tied_embed_lr, weight_decay=args.embed_wd),
                   dict(params=scalar_params, lr=args.scalar_lr, weight_decay=0.0)]
    if model.gate is not None:
        adam_groups.append(dict(params=list(model.gate.parameters()), lr=args.ngram_gate_lr, weight_decay=0.0))
    optimizers = [torch.optim.AdamW(adam_groups, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused),
                  Muon(matrix_params, lr=args.matrix_lr, momentum=args.muon_momentum,
                       backend_steps=args.muon_backend_steps, row_normalize=args.muon_row_normalize,
                       polar_express=args.muon_polar_express, weight_decay=args.muon_wd,
                       compile=fused and args.compile)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def training_progress(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Fraction of the run done: steps of ITERATIONS or, under a wallclock cap, elapsed time, whichever is ahead."""
    frac = step / args.iterations if args.iterations > 0 else 1.0
    if args.max_wallclock_seconds > 0:
        frac = max(frac, elapsed_ms / (1000.0 * args.max_wallclock_seconds))
    return min(frac, 1.0)


def lr_scale(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Linear warmdown to 0, so a run ends cooled down whether steps or the wallclock cap end it."""
    if args.warmdown_frac > 0:
        return min(1.0, (1.0 - training_progress(args, step, elapsed_ms)) / args.warmdown_frac)
    if args.warmdown_iters <= 0:
        return 1.0
    # WARMDOWN_ITERS (the baseline): the last N steps, counted by iterations and by the projected time left.
    scale = min(1.0, max(args.iterations - step, 0) / args.warmdown_iters)
    if args.max_wallclock_seconds > 0 and step > 0:
        warmdown_ms = args.warmdown_iters * elapsed_ms / step
        scale = min(scale, max(1000.0 * args.max_wallclock_seconds - elapsed_ms, 0.0) / warmdown_ms)
    return scale


class EMA:
    """Exponential moving average of the weights (float32 shadow); the export uses it (PR #1493: decay 0.9965)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: t.detach().float().clone() for name, t in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # One fused call over all tensors instead of a kernel launch per tensor.
        current = model.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [current[name].float() for name in self.shadow],
                             1.0 - self.decay)

    def state_dict(self, like: nn.Module) -> dict[str, Tensor]:
        """The averaged weights in `like`'s dtypes, ready for load_state_dict."""
        return {name: self.shadow[name].to(t.dtype) for name, t in like.state_dict().items()}


# -----------------------------
# DATA
# -----------------------------
# Shard = 256 little-endian int32 header [magic, version, n_tokens, 0...] + n_tokens little-endian uint16 ids.

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4


def read_shard_header(path: Path) -> int:
    """Validate a shard's header against its file size and return its token count."""
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is shorter than the {SHARD_HEADER_BYTES}-byte shard header")
    magic, version, n_tokens = (int(v) for v in np.fromfile(path, dtype="<i4", count=3))
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: bad shard magic {magic} (expected {SHARD_MAGIC})")
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {version} (expected {SHARD_VERSION})")
    expected = SHARD_HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise ValueError(f"{path}: header says {n_tokens} tokens, so the file should be {expected} bytes, "
                         f"but it is {size} bytes")
    return n_tokens


def load_data_shard(path: Path, vocab_size: int) -> Tensor:
    """The shard's tokens (never its header) as an int32 tensor, checked against the vocabulary."""
    n_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=n_tokens, offset=SHARD_HEADER_BYTES)
    if n_tokens and int(tokens.max()) >= vocab_size:
        index = int(np.argmax(tokens >= vocab_size))
        raise ValueError(f"{path}: token id {int(tokens[index])} at index {index} is >= VOCAB_SIZE={vocab_size}")
    return torch.from_numpy(tokens.astype(np.int32))


def list_shards(data_path: str, split: str) -> list[Path]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"no {split} shards match {pattern} (check DATA_PATH={data_path})")
    return files


class TokenStream:
    """The train shards in order as one endless, deterministic token stream that wraps after the last shard.
    `position` is the index (modulo `total_tokens`) of the next token to be taken."""

    def __init__(self, files: list[Path], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.total_tokens = sum(read_shard_header(f) for f in files)
        if self.total_tokens == 0:
            raise ValueError(f"train shards {files[0].parent} hold no tokens")
        self.file_index, self.offset, self.position = 0, 0, 0
        self.tokens = load_data_shard(files[0], vocab_size)

    def take(self, n: int) -> Tensor:
        parts, self.position = [], (self.position + n) % self.total_tokens
        while n > 0:
            if self.offset == len(self.tokens):
                self.file_index = (self.file_index + 1) % len(self.files)
                self.tokens, self.offset = load_data_shard(self.files[self.file_index], self.vocab_size), 0
                continue
            part = self.tokens[self.offset:self.offset + n]
            parts.append(part)
            self.offset += len(part)
            n -= len(part)
        return torch.cat(parts)


class DistributedTokenLoader:
    """Each step takes MICRO_BATCHES_PER_STEP consecutive spans of local_tokens + 1 tokens from the shared stream
    (one contiguous segment, read by every rank); rank r trains on spans r, r + W, r + 2W, ... So 1 process x 8
    micro-batches sees exactly the tokens that 8 processes x 1 micro-batch see."""

    def __init__(self, files: list[Path], rank: int, world_size: int, device: torch.device, vocab_size: int,
                 local_tokens: int):
        self.device, self.span = device, local_tokens + 1
        self.stream = TokenStream(files, vocab_size)
        # Where this rank's spans start in every step's segment; the same for all steps.
        self.span_starts = [self.span * (m * world_size + rank) for m in range(MICRO_BATCHES_PER_STEP // world_size)]

    def next_step(self) -> tuple[Tensor, int]:
        """(segment [8 * span] int64 on the device, stream position of segment[0]). The whole segment lets one
        n-gram lookup per step see every target's true preceding tokens in the train stream."""
        first = self.stream.position
        segment = self.stream.take(self.span * MICRO_BATCHES_PER_STEP).to(self.device, torch.int64, non_blocking=True)
        return segment, first


def load_validation_tokens(data_path: str, vocab_size: int, max_tokens: int) -> Tensor:
    tokens = torch.cat([load_data_shard(f, vocab_size) for f in list_shards(data_path, "val")])
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"validation split under DATA_PATH={data_path} has {len(tokens)} tokens; need >= 2")
    return tokens.long()


def load_tokenizer(path: str, vocab_size: int) -> spm.SentencePieceProcessor:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer not found: TOKENIZER_PATH={path}")
    sp = spm.SentencePieceProcessor(model_file=path)
    if int(sp.vocab_size()) != vocab_size:
        raise ValueError(f"tokenizer {path} has {int(sp.vocab_size())} pieces but VOCAB_SIZE={vocab_size}")
    return sp


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device):
    """Per-token byte counts for BPB (DESIGN.md section 3): (base bytes, starts with '▁', is control/unk/unused)."""
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    leading_space = np.zeros(vocab_size, dtype=np.bool_)
    is_boundary = np.ones(vocab_size, dtype=np.bool_)
    for token in range(vocab_size):
        if sp.is_control(token) or sp.is_unknown(token) or sp.is_unused(token):
            continue
        is_boundary[token] = False
        if sp.is_byte(token):
            base_bytes[token] = 1
            continue
        piece = sp.id_to_piece(token)
        if piece.startswith("▁"):
            leading_space[token], piece = True, piece[1:]
        base_bytes[token] = len(piece.encode("utf-8"))
    return tuple(torch.tensor(a, device=device) for a in (base_bytes, leading_space, is_boundary))


def count_target_bytes(prev_ids: Tensor, target_ids: Tensor, luts) -> Tensor:
    """UTF-8 bytes each target token adds to the text; the '▁' space counts unless it follows a boundary."""
    base_bytes, leading_space, is_boundary = luts
    return base_bytes[target_ids].long() + (leading_space[target_ids] & ~is_boundary[prev_ids]).long()


# -----------------------------
# MODEL
# -----------------------------


class RMSNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, rope_dims: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, rope_dims, 2).float() / rope_dims),
                             persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(seq_len, device=self.inv_freq.device).float(), self.inv_freq)
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the first 2 * cos.size(-1) dims of each head; the rest pass through (partial RoPE, PR #1493)."""
    rope_dims = 2 * cos.size(-1)
    half = rope_dims // 2
    x1, x2, rest = x[..., :half], x[..., half:rope_dims], x[..., rope_dims:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float,
                 rope_dims: int = 0, xsa: bool = False):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.xsa = xsa
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, kv_dim, bias=False)
        self.c_v = nn.Linear(dim, kv_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.zero_init = True
        # A learned per-head temperature on the normalized queries (baseline's q_gain).
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary = Rotary(rope_dims or self.head_dim, rope_base)

    def forward(self, x: Tensor) -> Tensor:
        bsz, seq_len, dim = x.shape
        q = self.c_q(x).reshape(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(seq_len, q.dtype)
        q = apply_rotary(q, cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        if self.xsa:
            y = exclusive_self_attention(y, v)
        return self.proj(y.transpose(1, 2).reshape(bsz, seq_len, dim))


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:  # [B, H, T, hd], [B, Hkv, T, hd] -> [B, H, T, hd]
    """XSA, exclusive self-attention (PR #1493 stack): remove from each head's output its component along the
    token's own value vector, so attention carries context rather than the token itself."""
    bsz, heads, seq_len, head_dim = y.shape
    y = y.reshape(bsz, v.size(1), heads // v.size(1), seq_len, head_dim)  # SDPA's GQA: head h reads KV h // group
    v_hat = F.normalize(v, dim=-1)[:, :, None]
    return (y - (y * v_hat).sum(-1, keepdim=True) * v_hat).reshape(bsz, heads, seq_len, head_dim)


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int, negative_slope: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, mlp_mult * dim, bias=False)
        self.proj = nn.Linear(mlp_mult * dim, dim, bias=False)
        self.proj.zero_init = True
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        # LeakyReLU(0.5)^2 keeps a gradient for negative inputs (PR #1493 stack); slope 0 is the baseline's relu^2.
        return self.proj(F.leaky_relu(self.fc(x), self.negative_slope).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, rope_base: float,
                 qk_gain_init: float, negative_slope: float = 0.0, rope_dims: int = 0, xsa: bool = False,
                 parallel: bool = False, ln_scale: float = 1.0):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(), RMSNorm()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init, rope_dims, xsa)
        self.mlp = MLP(dim, mlp_mult, negative_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Each block may mix the embedding x0 back into its input (baseline's resid_mix).
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # Parallel residual (GPT-J style, PR #1493 stack): attention and MLP both read the block's input.
        self.parallel, self.ln_scale = parallel, ln_scale

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        x = self.resid_mix[0].to(x.dtype) * x + self.resid_mix[1].to(x.dtype) * x0
        attn_out = self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x) * self.ln_scale)
        mlp_in = x if self.parallel else x + attn_out
        return x + attn_out + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(mlp_in) * self.ln_scale)


def virtual_layers(num_layers: int, num_loops: int, loop_start: int, loop_end: int) -> list[int]:
    """Block indices in execution order: blocks loop_start..loop_end run 1 + num_loops times (depth recurrence,
    PR #1493: 11 blocks, 3-5 looped twice more = 17 virtual layers)."""
    looped = list(range(loop_start, loop_end + 1)) * num_loops
    return list(range(loop_end + 1)) + looped + list(range(loop_end + 1, num_layers))


class GPT(nn.Module):
    """The baseline GPT (U-net skips between the first and second half of the layers, tied embeddings,
    tanh logit soft-cap) with the record stack's switches (see Hyperparameters) plus, when `num_experts` > 0,
    a gate Linear(model_dim -> 1 + num_experts) that weighs the neural distribution (slot 0) against the n-gram
    experts. Depth recurrence reuses blocks and is switched on mid-run with set_recurrence(True)."""

    def __init__(self, vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
                 mlp_mult: int, rope_base: float, logit_softcap: float, qk_gain_init: float,
                 tied_embed_init_std: float, num_experts: int = 0, neural_floor: float = 0.05,
                 mixture_loss_weight: float = 0.1, negative_slope: float = 0.0, rope_dims: int = 0,
                 ln_scale: bool = False, skip_gates: bool = False, parallel_residual_start: int = -1,
                 xsa_last_n: int = 0, num_loops: int = 0, loop_start: int = 0, loop_end: int = -1):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.neural_floor, self.mixture_loss_weight = neural_floor, mixture_loss_weight
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.ModuleList(
            Block(model_dim, num_heads, num_kv_heads, mlp_mult, rope_base, qk_gain_init, negative_slope, rope_dims,
                  xsa=i >= num_layers - xsa_last_n, parallel=0 <= parallel_residual_start <= i,
                  ln_scale=1.0 / math.sqrt(i + 1) if ln_scale else 1.0)
            for i in range(num_layers))
        self.plain_layers = list(range(num_layers))
        self.looped_layers = virtual_layers(num_layers, num_loops, loop_start, loop_end)
        self.execution_order = self.plain_layers
        # The first half of the (virtual) layers stores skips that the second half adds back in reverse order;
        # sized for the looped order, whose first rows the plain order uses.
        num_skips = len(self.looped_layers) // 2
        self.skip_weights = nn.Parameter(torch.ones(num_skips, model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, model_dim)) if skip_gates else None
        self.final_norm = RMSNorm()
        self.gate = nn.Linear(model_dim, 1 + num_experts) if num_experts else None
        nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
        if self.gate is not None:
            # Start by trusting the neural model: zero weights, bias +2 on the neural slot (PR #834's init).
            nn.init.zeros_(self.gate.weight)
            with torch.no_grad():
                self.gate.bias.zero_()[0] = 2.0

    def set_recurrence(self, active: bool) -> None:
        """Switch depth recurrence on (the looped execution order) or off; torch.compile recompiles once."""
        self.execution_order = self.looped_layers if active else self.plain_layers

    def layer_states(self, input_ids: Tensor) -> list[Tensor]:  # [B, T] int64 -> per virtual layer [B, T, D]
        """The residual stream after each virtual layer, in execution order (analysis tools probe these)."""
        x = x0 = F.rms_norm(self.tok_emb(input_ids), (self.tok_emb.embedding_dim,))
        num_encoder = len(self.execution_order) // 2
        skips, states = [], []
        for i, block_index in enumerate(self.execution_order):
            decoder_index = i - num_encoder
            if decoder_index >= 0 and skips:
                skip = self.skip_weights[decoder_index].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + skip
                else:
                    # Sigmoid-gated skip (PR #1493): a learned per-channel blend of the skip and the stream.
                    x = torch.lerp(skip, x, torch.sigmoid(self.skip_gates[decoder_index]).to(x.dtype))
            x = self.blocks[block_index](x, x0)
            if decoder_index < 0:
                skips.append(x)
            states.append(x)
        return states

    def hidden(self, input_ids: Tensor) -> Tensor:  # [B, T] int64 -> [B, T, D]
        return self.final_norm(self.layer_states(input_ids)[-1])

    def logits(self, h: Tensor) -> Tensor:  # [..., D] -> [..., V] float32, soft-capped
        # float32 before the tanh and every log_softmax: bf16 would cost the scores several digits.
        logits = F.linear(h, self.tok_emb.weight).float()
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)

    def gate_logits(self, h: Tensor) -> Tensor:  # [..., D] -> [..., 1 + K] float32
        return self.gate(h).float()

    def forward(self, input_ids: Tensor, target_ids: Tensor, expert_probs: Tensor | None = None,
                expert_valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training loss = neural CE + weight x mixture NLL. Returns (loss, neural CE, mixture NLL);
        expert_probs / expert_valid are [K, B*T] for the targets, from n-gram counts that exclude them."""
        h = self.hidden(input_ids).reshape(-1, self.tok_emb.embedding_dim)
        # One log_softmax serves the CE and the mixture.
        neural_lp = self.logits(h).log_softmax(-1).gather(1, target_ids.reshape(-1, 1)).squeeze(1)
        ce = -neural_lp.mean()
        if expert_probs is None:
            return ce, ce.detach(), ce.detach()
        mix_nll = -mixture_logprob_from_neural(neural_lp, expert_probs, expert_valid, self.gate_logits(h),
                                               self.neural_floor).mean()
        return ce + self.mixture_loss_weight * mix_nll, ce.detach(), mix_nll.detach()


def build_model(args: Hyperparameters, device: torch.device) -> GPT:
    return GPT(args.vocab_size, args.num_layers, args.model_dim, args.num_heads, args.num_kv_heads, args.mlp_mult,
               args.rope_base, args.logit_softcap, args.qk_gain_init, args.tied_embed_init_std,
               num_experts=len(ngram_orders(args)), neural_floor=args.ngram_neural_floor,
               mixture_loss_weight=args.ngram_loss_weight, negative_slope=args.mlp_negative_slope,
               rope_dims=args.rope_dims, ln_scale=args.ln_scale, skip_gates=args.skip_gates,
               parallel_residual_start=args.parallel_residual_start, xsa_last_n=args.xsa_last_n,
               num_loops=args.num_loops, loop_start=args.loop_start, loop_end=args.loop_end).to(device)


# -----------------------------
# N-GRAM EXPERTS
# -----------------------------


def expert_inputs(tables: NgramTables, stream: Tensor, positions: Tensor, min_count: int,
                  exclude_self: bool | Tensor = False) -> tuple[Tensor, Tensor]:
    """The experts' probabilities of stream[t] for each position t: ([K, P] float32, [K, P] bool valid).
    An expert is valid where its context was seen at least `min_count` times; the gate ignores the others."""
    context_count, pair_count = tables.lookup(stream, positions, exclude_self=exclude_self)
    valid = context_count >= max(min_count, 1)
    probs = torch.where(valid, pair_count.float() / context_count.clamp_min(1).float(), 0.0)
    return probs, valid


def leave_one_out_mask(orders: tuple[int, ...], stream_positions: Tensor, prefill_tokens: int) -> Tensor:
    """[K, P] bool: where the n-gram ending at these train-stream positions was counted into the frozen tables,
    so its own occurrence must be subtracted. The tables hold stream[0:prefill_tokens]; an n-gram whose window
    wraps past the end of the stream back to its start (position < n-1) was never counted."""
    order = torch.tensor(orders, device=stream_positions.device)[:, None]
    return (stream_positions < prefill_tokens)[None, :] & (stream_positions[None, :] >= order - 1)


# -----------------------------
# EVALUATION
# -----------------------------
# Every target t in [1, N) of the val stream is scored exactly once, from a normalized distribution that
# depends only on tokens < t (plus, with the cache and TTT, on tokens of earlier, already-scored chunks).


def window_schedule(first: int, end: int, seq_len: int, stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """Sliding windows that score targets [first, end) once each. Window i reads tokens[start[i] : hi[i] - 1]
    (at most seq_len) and scores targets lo[i] <= t < hi[i], its last <= stride positions, so every target sees
    at least seq_len - stride tokens of context, or all the context there is. stride == seq_len gives the plain
    non-overlapping evaluation."""
    lo = torch.arange(first, end, stride)
    hi = (lo + stride).clamp(max=end)
    start = (hi - 1 - seq_len).clamp(min=0)
    # Windows that start at token 0 all see every token before their targets: one window scores them all.
    n_head = int((start == 0).sum())
    if n_head > 1:
        lo, hi, start = torch.cat((lo[:1], lo[n_head:])), hi[n_head - 1:], start[n_head - 1:]
    return start, lo, hi


@dataclass
class EvalSetup:
    model: GPT
    hidden_fn: object  # model.hidden, compiled on CUDA
    tokens: Tensor  # [N] int64 val stream on the device
    luts: tuple
    seq_len: int
    stride: int
    windows_per_batch: int
    rank: int
    world_size: int
    min_count: int = 2
    autocast: object = nullcontext


def score_span(setup: EvalSetup, first: int, end: int, cache: NgramTables | None = None,
               audit_positions: Tensor | None = None, per_target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Score this rank's share of the windows covering targets [first, end). Returns (sums, audit) where sums =
    [neural NLL, mixture NLL, bytes, tokens] (float64) and audit = [positions, max |sum p - 1|, max gold error].
    With `cache`, each target's distribution mixes in the cache experts through the model's gate; the cache must
    hold only tokens < first (score-then-update). `per_target`, if given, receives each mixture NLL at [t - 1]."""
    tokens, model, device = setup.tokens, setup.model, setup.tokens.device
    start, lo, hi = (t.to(device) for t in window_schedule(first, end, setup.seq_len, setup.stride))
    n = len(start)
    share = slice(n * setup.rank // setup.world_size, n * (setup.rank + 1) // setup.world_size)
    start, lo, hi = start[share], lo[share], hi[share]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    audit = torch.zeros(3, dtype=torch.float64, device=device)
    offsets = torch.arange(setup.seq_len, device=device)
    for i in range(0, len(start), setup.windows_per_batch):
        batch = slice(i, i + setup.windows_per_batch)
        input_index = (start[batch, None] + offsets).clamp(max=len(tokens) - 1)
        target_index = input_index + 1
        # Past a short window's end the inputs are later tokens; causal attention keeps them out of its targets.
        scored = (target_index >= lo[batch, None]) & (target_index < hi[batch, None])
        with setup.autocast():
            h = setup.hidden_fn(tokens[input_index])[scored]
            logits = model.logits(h)
        positions = target_index[scored]
        targets = tokens[positions]
        neural_lp = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        mixed_lp = neural_lp
        if cache is not None:
            probs, valid = expert_inputs(cache, tokens, positions, setup.min_count)
            gate = model.gate_logits(h)
            mixed_lp = mixture_logprob_from_neural(neural_lp, probs, valid, gate, model.neural_floor)
            if audit_positions is not None:
                audit = audit_distributions(setup, cache, positions, logits, gate, valid, mixed_lp,
                                            audit_positions, audit)
        n_bytes = count_target_bytes(tokens[positions - 1], targets, setup.luts)
        # Sums in float64 and one division at the end (BPB = sum NLL / ln 2 / sum bytes), as nanochat does.
        sums += torch.stack((-neural_lp.double().sum(), -mixed_lp.double().sum(), n_bytes.double().sum(),
                             torch.tensor(float(len(positions)), dtype=torch.float64, device=device)))
        if per_target is not None:
            per_target[positions - 1] = -mixed_lp.double()
    return sums, audit


def audit_distributions(setup: EvalSetup, cache: NgramTables, positions: Tensor, logits: Tensor, gate: Tensor,
                        valid: Tensor, mixed_lp: Tensor, audit_positions: Tensor, audit: Tensor) -> Tensor:
    """Materialize the full mixed distribution over the vocabulary at the audited positions, from exactly the
    state that scored them, and track how far it is from summing to 1 and from the scored gold probability."""
    rows = torch.nonzero(torch.isin(positions, audit_positions)).flatten()
    context_len = max(cache.orders) - 1
    for row in rows.tolist():
        t = int(positions[row])
        expert_dists = cache.distribution(setup.tokens[max(0, t - context_len):t])[:, None, :]
        dist_row = mixture_distribution(logits[row:row + 1], expert_dists, valid[:, row:row + 1],
                                        gate[row:row + 1], setup.model.neural_floor)[0]
        sum_err = (dist_row.sum() - 1.0).abs()
        gold_err = (dist_row[setup.tokens[t]] - mixed_lp[row].double().exp()).abs()
        audit = torch.stack((audit[0] + 1, torch.maximum(audit[1], sum_err), torch.maximum(audit[2], gold_err)))
    return audit


def all_reduce(tensor: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def eval_val(setup: EvalSetup) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) of the neural model over every val target."""
    was_training = setup.model.training
    setup.model.eval()
    with torch.inference_mode():
        sums, _ = score_span(setup, 1, len(setup.tokens))
    setup.model.train(was_training)
    nll, _, n_bytes, n_tokens = all_reduce(sums).tolist()
    return nll / n_tokens, nll / math.log(2.0) / n_bytes


def chunk_bounds(n_tokens: int, chunk_tokens: int) -> list[int]:
    """Target boundaries 1 = b0 < b1 < ... = n_tokens of the score-then-update chunks."""
    return list(range(1, n_tokens, chunk_tokens)) + [n_tokens]


def ttt_on_chunk(setup: EvalSetup, optimizer: torch.optim.Optimizer, params: list[Tensor], first: int,
                 end: int, epochs: int) -> None:
    """Test-time training on targets [first, end), which have all been scored already: `epochs` SGD steps on the
    chunk's CE, the chunk's sequences split across ranks and the gradients summed so all ranks stay identical."""
    seq_len = min(setup.seq_len, end - first)
    n_seqs = (end - first) // seq_len
    starts = (first - 1 + seq_len * torch.arange(n_seqs, device=setup.tokens.device))[setup.rank::setup.world_size]
    index = starts[:, None] + torch.arange(seq_len, device=starts.device)
    setup.model.train()
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=False)
        if len(starts):
            with setup.autocast():
                logits = setup.model.logits(setup.hidden_fn(setup.tokens[index]))
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), setup.tokens[index + 1].reshape(-1),
                                       reduction="sum")
            (loss / (n_seqs * seq_len)).backward()
        if setup.world_size > 1:
            flat = all_reduce(torch.cat([p.grad.reshape(-1) for p in params]))
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        optimizer.step()
    setup.model.eval()


@dataclass
class NgramEvalResult:
    val_loss: float
    val_bpb: float
    neural_val_loss: float
    scored_tokens: int
    scored_bytes: int
    audit_positions: int
    audit_sum_err: float
    audit_gold_err: float
    time_ms: dict
    per_target_nll: Tensor | None = None


def eval_ngram_ttt(setup: EvalSetup, bounds: list[int], cache: NgramTables | None, ttt_epochs: int, ttt_lr: float,
                   ttt_momentum: float, audit_positions: Tensor | None = None,
                   return_per_target: bool = False) -> NgramEvalResult:
    """Score-then-update over the chunks [bounds[i], bounds[i+1]): score every target of the chunk (neural +
    cache experts + gate), THEN extend the cache with the chunk, THEN train on it (TTT). `cache` must start empty
    (it is identical on all ranks); nothing of a chunk reaches the cache or the weights before it is scored."""
    tokens, device = setup.tokens, setup.tokens.device
    # TTT adapts every transformer weight; the gate has no CE gradient and stays as trained.
    params = [p for name, p in setup.model.named_parameters() if not name.startswith("gate.")]
    optimizer = torch.optim.SGD(params, lr=ttt_lr, momentum=ttt_momentum) if ttt_epochs > 0 else None
    for p in params:
        # Dense zero grads on every rank, even one without sequences in a chunk, so the all-reduce always matches.
        p.grad = torch.zeros_like(p) if optimizer else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    audit = torch.zeros(3, dtype=torch.float64, device=device)
    per_target = torch.zeros(len(tokens) - 1, dtype=torch.float64, device=device) if return_per_target else None
    time_ms = dict(score=0.0, cache=0.0, ttt=0.0)
    cached_until = 0
    setup.model.eval()

    def timed(key, fn, *fn_args):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*fn_args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        time_ms[key] += 1000.0 * (time.perf_counter() - t0)
        return out

    def score(first, end):
        with torch.inference_mode():
            return score_span(setup, first, end, cache, audit_positions, per_target)

    for first, end in zip(bounds[:-1], bounds[1:]):
        chunk_sums, chunk_audit = timed("score", score, first, end)
        sums += chunk_sums
        audit = torch.cat((audit[:1] + chunk_audit[:1], torch.maximum(audit[1:], chunk_audit[1:])))
        if end == bounds[-1]:
            break  # nothing is left to score, so the last chunk need not be learned from
        if cache is not None:
            timed("cache", cache.extend, tokens[cached_until:end])
            cached_until = end
        if optimizer is not None:
            timed("ttt", ttt_on_chunk, setup, optimizer, params, first, end, ttt_epochs)
    all_reduce(sums)
    all_reduce(audit[:1])
    all_reduce(audit[1:], dist.ReduceOp.MAX if dist.is_initialized() else None)
    if per_target is not None:
        all_reduce(per_target)
    neural_nll, mixed_nll, n_bytes, n_tokens = sums.tolist()
    time_ms["total"] = sum(time_ms.values())
    return NgramEvalResult(mixed_nll / n_tokens, mixed_nll / math.log(2.0) / n_bytes, neural_nll / n_tokens,
                           int(n_tokens), int(n_bytes), int(audit[0]), float(audit[1]), float(audit[2]), time_ms,
                           per_target)


def sample_audit_positions(n_tokens: int, count: int, seed: int, device: torch.device) -> Tensor:
    """Random val targets (same on every rank) whose full mixed distributions the legality audit materializes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.unique(torch.randint(1, n_tokens, (count,), generator=generator)).to(device)


# -----------------------------
# QUANTIZATION + COMPRESSION
# -----------------------------
# The score is always that of the artifact: quantize, compress, write, read back, decompress, dequantize, eval.

QUANT_MIN_NUMEL = 65_536  # smaller tensors (norm scales, residual mixes, the gate) stay fp16: few bytes, touchy
ZSTD_LEVEL = 22
# Artifact file = ARTIFACT_MAGIC + one byte (index into COMPRESSORS) + compressed byte-shuffled torch.save(blob).
# Files that start with the zstd frame magic are the earlier raw-zstd artifacts (formats int8_zstd / int6_zstd).
ARTIFACT_MAGIC = b"PGA1"
COMPRESSORS = ("zstd", "lzma", "brotli")
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"


@torch.no_grad()
def collect_hessians(model: GPT, calib_batches: list[Tensor]) -> dict[str, Tensor]:
    """GPTQ's H = sum X^T X of the inputs of every quantized matrix, over this rank's calibration batches ([B, T]
    int64 training tokens), summed over ranks. The tied embedding's input is the final hidden state it scores."""
    hessians, hooks = {}, []

    def add(name: str, x: Tensor) -> None:
        x = x.detach().float().reshape(-1, x.size(-1))
        hessians[name] = hessians.get(name, 0) + x.T @ x

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.numel() >= QUANT_MIN_NUMEL and module is not model.gate:
            hooks.append(module.register_forward_hook(lambda m, inp, out, n=name: add(n + ".weight", inp[0])))
    hooks.append(model.final_norm.register_forward_hook(lambda m, inp, out: add("tok_emb.weight", out)))
    was_training = model.training
    model.eval()
    for batch in calib_batches:
        model.hidden(batch)
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return {name: all_reduce(h) for name, h in sorted(hessians.items())}


def sdclip_scale(w: Tensor, qmax: int, clip_sigmas: float) -> Tensor:  # [R, C] float32 -> [R] fp16
    """SDClip (PR #1493): clip each row at k * std(row), so one outlier cannot stretch the whole row's grid;
    k = 0 clips at the row's abs max (round-to-nearest without clipping). fp16 scales make dequant exact."""
    clip = clip_sigmas * w.std(dim=1) if clip_sigmas > 0 else w.abs().amax(dim=1)
    return (clip / qmax).clamp_min(2.0 ** -14).half()


def gptq_quantize(w: Tensor, hessian: Tensor, scale: Tensor, qmax: int, block: int = 128) -> Tensor:
    """Full-Hessian GPTQ (arXiv 2210.17323) on a fixed per-row grid: quantize columns in order of decreasing
    H_jj and push each column's rounding error onto the columns not yet quantized. [R, C] float32 -> int8."""
    hessian = hessian.clone()
    dead = hessian.diag() == 0
    hessian[dead, dead] = 1.0
    hessian.diagonal().add_(0.01 * hessian.diag().mean())
    perm = torch.argsort(hessian.diag(), descending=True)
    w, hessian = w[:, perm].clone(), hessian[perm][:, perm]
    w[:, dead[perm]] = 0.0
    # Upper Cholesky factor of H^-1: row j holds the error-propagation weights of column j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    s = scale.float()
    q = torch.zeros_like(w, dtype=torch.int8)
    for i1 in range(0, w.size(1), block):
        i2 = min(i1 + block, w.size(1))
        wb, err = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for j in range(i2 - i1):
            qj = torch.round(wb[:, j] / s).clamp(-qmax, qmax)
            q[:, i1 + j] = qj.to(torch.int8)
            err[:, j] = (wb[:, j] - qj * s) / hinv[i1 + j, i1 + j]
            wb[:, j:] -= err[:, j:j + 1] * hinv[i1 + j, i1 + j:i2][None, :]
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)]


def quantize_state_dict(state_dict: dict[str, Tensor], bits: int, hessians: dict[str, Tensor] | None = None,
                        clip_sigmas: float = 0.0, embed_bits: int | None = None,
                        embed_clip_sigmas: float = 0.0) -> dict:
    """Per-row symmetric quantization of the large matrices to [-qmax, qmax] (int8 storage; int6 values compress
    better) with one fp16 scale per row: GPTQ where `hessians` has the matrix, round-to-nearest elsewhere. The
    embedding gets embed_bits / embed_clip_sigmas (default: as the matrices); every other tensor is stored fp16.
    Runs where the tensors are (GPTQ's column loop is thousands of small steps: on GPU it takes seconds)."""
    gptq = bool(hessians)
    blob = {"__format__": f"int{bits}{'_gptq' if gptq else ''}_v1", "quantized": {}, "scales": {}, "float16": {},
            "dtypes": {}}
    for name, tensor in state_dict.items():
        t = tensor.detach().float()
        blob["dtypes"][name] = str(tensor.dtype).removeprefix("torch.")
        if t.ndim == 2 and t.numel() >= QUANT_MIN_NUMEL:
            is_embed = name == "tok_emb.weight"
            qmax = 2 ** (((embed_bits or bits) if is_embed else bits) - 1) - 1
            scale = sdclip_scale(t, qmax, embed_clip_sigmas if is_embed else clip_sigmas)
            if gptq and name in hessians:
                q = gptq_quantize(t, hessians[name].to(t.device, torch.float32), scale, qmax)
            else:
                q = torch.round(t / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int8)
            blob["quantized"][name], blob["scales"][name] = q.cpu(), scale.cpu()
        else:
            blob["float16"][name] = t.half().cpu()
    return blob


def dequantize_state_dict(blob: dict) -> dict[str, Tensor]:
    tensors = {name: q.float() * blob["scales"][name].float()[:, None] for name, q in blob["quantized"].items()}
    tensors.update((name, t.float()) for name, t in blob["float16"].items())
    return {name: tensors[name].to(getattr(torch, dtype)) for name, dtype in blob["dtypes"].items()}


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """Bytes 0, 2, 4, ... then 1, 3, 5, ...: the fp16 scales' high and low bytes each form a smoother stream
    (PR #1089)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    return b"".join(arr[i::stride].tobytes() for i in range(stride))


def byte_unshuffle(data: bytes, stride: int = 2) -> bytes:
    arr, out = np.frombuffer(data, dtype=np.uint8), np.empty(len(data), dtype=np.uint8)
    offset = 0
    for i in range(stride):
        n = len(range(i, len(data), stride))
        out[i::stride] = arr[offset:offset + n]
        offset += n
    return out.tobytes()


def _codec(name: str):
    """(compress, decompress) of one of COMPRESSORS at its strongest setting."""
    if name == "zstd":
        return (zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress, zstandard.ZstdDecompressor().decompress)
    if name == "lzma":
        return (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress)
    import brotli  # imported here so the rest of the kit works without it

    return (lambda b: brotli.compress(b, quality=11), brotli.decompress)


def compress_artifact(blob: dict, compressor: str = "zstd") -> bytes:
    """The artifact's bytes: header, then the byte-shuffled blob compressed with `compressor`, or with each of
    COMPRESSORS keeping the smallest for "best" (env COMPRESSOR)."""
    if compressor not in COMPRESSORS + ("best",):
        raise ValueError(f"COMPRESSOR={compressor} must be one of {', '.join(COMPRESSORS)}, best")
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    data = byte_shuffle(buffer.getvalue())
    candidates = [ARTIFACT_MAGIC + bytes([COMPRESSORS.index(name)]) + _codec(name)[0](data)
                  for name in (COMPRESSORS if compressor == "best" else (compressor,))]
    return min(candidates, key=len)


def load_artifact(path: Path) -> dict:
    """The quantized blob of an artifact file (this format or the earlier raw-zstd one), with "__compressor__"."""
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path}")
    raw = path.read_bytes()
    try:
        if raw[:4] == ZSTD_FRAME_MAGIC:
            compressor, data = "zstd", zstandard.ZstdDecompressor().decompress(raw)
        elif raw[:4] == ARTIFACT_MAGIC and raw[4] < len(COMPRESSORS):
            compressor = COMPRESSORS[raw[4]]
            data = byte_unshuffle(_codec(compressor)[1](raw[5:]))
        else:
            raise ValueError("unknown header")
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a zstd-compressed artifact nor a {ARTIFACT_MAGIC!r} one ({err})") from None
    # Earlier files named their compressor in the format (int8_zstd_v1); today the header names it.
    blob["__format__"] = str(blob.get("__format__")).replace("_zstd_v1", "_v1") if raw[:4] == ZSTD_FRAME_MAGIC \
        else blob.get("__format__")
    if not re.fullmatch(r"int[2-8](_gptq)?_v1", str(blob["__format__"])):
        raise ValueError(f"{path}: unknown artifact format {blob['__format__']!r}")
    blob["__compressor__"] = compressor
    return blob


def artifact_label(blob: dict) -> str:
    """The name logs give a loaded artifact's format, e.g. int6_gptq_brotli (int8_zstd = the baseline's)."""
    return f"{blob['__format__'].removesuffix('_v1')}_{blob['__compressor__']}"


def calibration_batches(args: Hyperparameters, rank: int, world_size: int, device: torch.device) -> list[Tensor]:
    """This rank's share of GPTQ_CALIB_BATCHES batches ([B, TRAIN_SEQ_LEN] int64) from the start of the train
    stream: training tokens only, the same batches whatever the world size."""
    if args.gptq_calib_batches == 0:
        return []
    stream = TokenStream(list_shards(args.data_path, "train"), args.vocab_size)
    batch_tokens = args.train_batch_tokens // MICRO_BATCHES_PER_STEP
    batches = [stream.take(batch_tokens) for _ in range(args.gptq_calib_batches)]
    return [b.to(device, torch.int64).reshape(-1, args.train_seq_len) for b in batches[rank::world_size]]


def export_artifact(args: Hyperparameters, model: GPT, ema: EMA | None, calib_batches: list[Tensor],
                    master: bool = True) -> bytes:
    """Load the EMA weights into `model` (they are what is exported and scored), collect GPTQ Hessians (every
    rank: they are all-reduced), then on the master quantize and compress. Returns the artifact (b"" elsewhere)."""
    if ema is not None:
        model.load_state_dict(ema.state_dict(model))
    hessians = collect_hessians(model, calib_batches) if args.gptq_calib_batches > 0 else None
    if not master:
        return b""
    blob = quantize_state_dict(model.state_dict(), args.quant_bits, hessians, args.matrix_clip_sigmas,
                               args.embed_bits, args.embed_clip_sigmas)
    return compress_artifact(blob, args.compressor)


def model_from_artifact(args: Hyperparameters, path: Path, device: torch.device) -> GPT:
    """A fresh model built from the artifact's bytes alone, as the evaluation and the analysis tools load it.
    A trained model ends with depth recurrence on, so the reloaded one runs it too."""
    model = build_model(args, device)
    model.load_state_dict(dequantize_state_dict(load_artifact(Path(path))))
    model.set_recurrence(True)
    return model


def check_artifact_size(total_bytes: int) -> bool:
    return total_bytes <= ARTIFACT_CAP_BYTES


# -----------------------------
# TRAINING
# -----------------------------


def main() -> None:
    args = Hyperparameters()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    validate_hyperparameters(args, world_size)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    compile_model = args.compile and use_cuda
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_cuda else nullcontext

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    # Every rank must agree on the run id: it names the artifact they all reload.
    run_id = [args.run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]]
    if distributed:
        dist.broadcast_object_list(run_id)
    run_id = run_id[0]
    log_path, artifact_path = Path("logs") / f"{run_id}.txt", Path(f"final_model.{run_id}.ptz")
    for path in [log_path] + ([] if args.eval_artifact else [artifact_path]):
        if path.exists():
            raise FileExistsError(f"{path} exists: set another RUN_ID so earlier runs are kept")
    if distributed:
        dist.barrier()
    if master:
        log_path.parent.mkdir(exist_ok=True)

    def log0(msg: str, console: bool = True) -> None:
        if master:
            if console:
                print(msg, flush=True)
            with open(log_path, "a", encoding="utf-8") as f:
                print(msg, file=f)

    code_files = [Path(__file__).resolve(), Path(ngram_mixer.__file__).resolve()]
    code = [f.read_bytes() for f in code_files]
    for path, source in zip(code_files, code):
        log0(f"===== {path.name} =====\n{source.decode('utf-8')}", console=False)
    log0(f"Running Python {sys.version.split()[0]}, PyTorch {torch.__version__}, "
         f"{torch.cuda.get_device_name(device) if use_cuda else 'CPU'}", console=False)
    log0(f"run_id:{run_id}")
    for name in sorted(vars(Hyperparameters)):
        if not name.startswith("_"):
            log0(f"hparam {name}:{getattr(args, name)}")
    log0(f"world_size:{world_size} grad_accum_steps:{MICRO_BATCHES_PER_STEP // world_size} device:{device} "
         f"torch:{torch.__version__} compile:{compile_model}")
    log0(f"code_sha256:{hashlib.sha256(b''.join(code)).hexdigest()}")
    code_bytes = sum(len(c) for c in code)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    luts = build_byte_luts(sp, args.vocab_size, device)
    val_tokens = load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens).to(device)
    log0(f"val_tokens:{len(val_tokens)} scored_targets:{len(val_tokens) - 1}")
    orders = ngram_orders(args)

    def eval_setup(model: GPT, stride: int) -> EvalSetup:
        hidden_fn = torch.compile(model.hidden) if compile_model else model.hidden
        windows_per_batch = max(1, args.val_batch_size // (world_size * args.train_seq_len))
        return EvalSetup(model, hidden_fn, val_tokens, luts, args.train_seq_len, stride, windows_per_batch, rank,
                         world_size, args.ngram_min_count, autocast)

    def log_peak_memory() -> None:
        if use_cuda:
            log0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                 f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        else:
            log0(f"peak memory rss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")

    def evaluate_artifact(path: Path) -> None:
        model_bytes = path.stat().st_size
        blob = load_artifact(path)
        quant = artifact_label(blob)
        log0(f"Serialized model {quant}: {model_bytes} bytes")
        log0(f"Code size: {code_bytes} bytes")
        log0(f"Total submission size {quant}: {code_bytes + model_bytes} bytes")
        if not check_artifact_size(code_bytes + model_bytes):
            log0(f"ARTIFACT_OVER_CAP total:{code_bytes + model_bytes} cap:{ARTIFACT_CAP_BYTES}")
            sys.exit(3)
        # A fresh model from the artifact's bytes alone: the score is that of what would be submitted.
        model = model_from_artifact(args, path, device)
        setup = eval_setup(model, args.eval_stride)
        sync()
        t0 = time.perf_counter()
        val_loss, val_bpb = eval_val(setup)
        sync()
        roundtrip_ms = 1000.0 * (time.perf_counter() - t0)
        log0(f"final_{quant}_roundtrip val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{roundtrip_ms:.0f}ms")
        log0(f"final_{quant}_roundtrip_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
        if not (orders or args.ttt):
            return
        audit = sample_audit_positions(len(val_tokens), args.audit_positions, args.seed, device) if orders else None
        # A fresh cache: the training-time tables are never consulted at evaluation.
        cache = NgramTables(args.vocab_size, orders, device=device) if orders else None
        result = eval_ngram_ttt(setup, chunk_bounds(len(val_tokens), args.eval_chunk_tokens), cache,
                                args.ttt_epochs if args.ttt else 0, args.ttt_lr, args.ttt_momentum, audit)
        if orders:
            log0(f"legality_audit positions:{result.audit_positions} max_abs_sum_err:{result.audit_sum_err:.3e} "
                 f"max_gold_err:{result.audit_gold_err:.3e}")
            if not (result.audit_positions > 0 and max(result.audit_sum_err, result.audit_gold_err) <= 1e-4):
                log0("LEGALITY_AUDIT_FAILED: a scored distribution does not sum to 1 or does not match its score")
                sys.exit(4)
        times = dict(result.time_ms, total=result.time_ms["total"] + roundtrip_ms)
        log0(f"scored_tokens:{result.scored_tokens} scored_bytes:{result.scored_bytes}")
        log0("eval_time " + " ".join(f"{k}:{v:.0f}ms" for k, v in dict(roundtrip=roundtrip_ms, **times).items()))
        log0(f"final_ngram_ttt val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} "
             f"neural_val_loss:{result.neural_val_loss:.4f}")
        log0(f"final_ngram_ttt_exact val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}")

    if args.eval_artifact:
        evaluate_artifact(Path(args.eval_artifact))
        log_peak_memory()
        return

    # Model and optimizers: Muon for the block matrices, Adam for the embedding, the scalars and the gate.
    base_model = build_model(args, device)
    # DDP wraps the compiled module (as in the baseline); the optimizers hold the uncompiled parameters.
    compiled_model = torch.compile(base_model) if compile_model else base_model
    model = DDP(compiled_model, device_ids=[local_rank] if use_cuda else None,
                broadcast_buffers=False) if distributed else compiled_model
    optimizers = build_optimizers(args, base_model)
    log0(f"model_params:{sum(p.numel() for p in base_model.parameters())} ngram_orders:{list(orders)}")

    train_files = list_shards(args.data_path, "train")
    grad_accum_steps = MICRO_BATCHES_PER_STEP // world_size
    local_tokens = args.train_batch_tokens // MICRO_BATCHES_PER_STEP
    max_wallclock_ms = 1000.0 * args.max_wallclock_seconds if args.max_wallclock_seconds > 0 else None

    # Frozen n-gram tables from the first NGRAM_PREFILL_TOKENS of the train stream, identical on every rank.
    # Prefill counts against the training wallclock.
    sync()
    t0 = time.perf_counter()
    tables, prefill_tokens = None, 0
    if orders:
        prefill_stream = TokenStream(train_files, args.vocab_size)
        prefill_tokens = min(args.ngram_prefill_tokens, prefill_stream.total_tokens)
        tables = NgramTables(args.vocab_size, orders, device=device)
        # Pieces of 64M tokens bound the sort's temporary memory; chunked extends give identical tables.
        for begin in range(0, prefill_tokens, 1 << 26):
            tables.extend(prefill_stream.take(min(1 << 26, prefill_tokens - begin)).to(device, torch.int64))
        sync()
    prefill_ms = 1000.0 * (time.perf_counter() - t0)
    if tables is not None:
        log0(f"ngram_prefill tokens:{prefill_tokens} time:{prefill_ms:.0f}ms bytes:{tables.nbytes()}")

    def train_step(loader: DistributedTokenLoader) -> Tensor:
        """One optimizer step's forward/backward over this rank's micro-batches; returns mean [loss, CE, mix]."""
        stats = torch.zeros(3, device=device)
        segment, segment_position = loader.next_step()
        probs = valid = None
        if tables is not None:
            stream_positions = (segment_position + lookup_positions) % loader.stream.total_tokens
            probs, valid = expert_inputs(tables, segment, lookup_positions, args.ngram_min_count,
                                         leave_one_out_mask(orders, stream_positions, prefill_tokens))
        for micro_step, start in enumerate(loader.span_starts):
            local = segment[start:start + loader.span]
            x, y = local[:-1].reshape(-1, args.train_seq_len), local[1:].reshape(-1, args.train_seq_len)
            micro = slice(micro_step * local_tokens, (micro_step + 1) * local_tokens)
            experts = (probs[:, micro], valid[:, micro]) if probs is not None else (None, None)
            if distributed:
                model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
            with autocast():
                loss, ce, mix_nll = model(x, y, *experts)
            # Averaging over micro-batches (and DDP over ranks) gives the gradient of the global batch mean.
            (loss / grad_accum_steps).backward()
            stats += torch.stack((loss.detach(), ce, mix_nll)).float() / grad_accum_steps
        return stats

    def optimizer_step(step: int, lr_scale: float) -> None:
        momentum_frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
        for group in optimizers[1].param_groups:
            group["momentum"] = (1 - momentum_frac) * args.muon_momentum_warmup_start + \
                momentum_frac * args.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    # Warmup steps prime torch.compile and the kernels, then the initial weights, optimizer state and data
    # stream are restored, so measured training starts from the true init (as in the challenge baseline).
    train_loader = DistributedTokenLoader(train_files, rank, world_size, device, args.vocab_size, local_tokens)
    # One n-gram lookup per step for all micro-batches: the targets are positions 1..local_tokens of each span.
    lookup_positions = (torch.tensor(train_loader.span_starts, device=device)[:, None] +
                        torch.arange(1, local_tokens + 1, device=device)).reshape(-1)
    if args.warmup_steps > 0:
        initial_model = copy.deepcopy(base_model.state_dict())
        initial_optimizers = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        for warmup_step in range(args.warmup_steps):
            # The second half runs the looped order, so its graph too is compiled before the clock starts.
            base_model.set_recurrence(warmup_step >= args.warmup_steps // 2)
            train_step(train_loader)
            optimizer_step(0, 1.0)
            if warmup_step < 3 or warmup_step + 1 == args.warmup_steps:
                log0(f"warmup_step:{warmup_step + 1}/{args.warmup_steps}")
        base_model.set_recurrence(False)
        base_model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_optimizers):
            opt.load_state_dict(state)
        train_loader = DistributedTokenLoader(train_files, rank, world_size, device, args.vocab_size, local_tokens)

    val_setup = eval_setup(base_model, args.train_seq_len)
    ema = EMA(base_model, args.ema_decay) if args.ema_decay > 0 else None
    training_time_ms, stop_after_step, step = prefill_ms, None, 0
    sync()
    t0 = time.perf_counter()
    while True:
        last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
        if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            sync()
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            val_loss, val_bpb = eval_val(val_setup)
            log0(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                 f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < args.iterations:
                log0(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{args.iterations}")
            break
        elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        # Depth recurrence from ENABLE_LOOPING_AT of the run on (model stack hook).
        base_model.set_recurrence(training_progress(args, step, elapsed_ms) >= args.enable_looping_at)
        stats = train_step(train_loader)
        optimizer_step(step, lr_scale(args, step, elapsed_ms))
        if ema is not None:
            ema.update(base_model)
        step += 1
        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        # One small all-reduce per step: stop together at the cap, and fail fast on a non-finite loss.
        flags = torch.stack((torch.tensor(float(max_wallclock_ms is not None and approx_ms >= max_wallclock_ms),
                                          device=device), (~torch.isfinite(stats)).any().float()))
        reached_cap, non_finite = all_reduce(flags, dist.ReduceOp.MAX if distributed else None).tolist()
        if non_finite:
            raise RuntimeError(f"non-finite train loss at step {step}: loss, CE, mix = {stats.tolist()}")
        if stop_after_step is None and reached_cap:
            stop_after_step = step
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or
                                         stop_after_step is not None or step == args.iterations):
            _, ce, mix_nll = (all_reduce(stats) / world_size).tolist()
            log0(f"step:{step}/{args.iterations} train_loss:{ce:.4f} train_time:{approx_ms:.0f}ms "
                 f"step_avg:{approx_ms / step:.2f}ms" + (f" mix_nll:{mix_nll:.4f}" if tables is not None else ""))
    log_peak_memory()
    del tables

    # Export (model stack hooks): the EMA weights, GPTQ Hessians from training tokens on every rank, then rank 0
    # quantizes, compresses and writes the artifact; after the barrier every rank reloads and scores that file.
    with autocast():
        artifact = export_artifact(args, base_model, ema, calibration_batches(args, rank, world_size, device), master)
    if master:
        artifact_path.write_bytes(artifact)
    if distributed:
        dist.barrier()
    evaluate_artifact(artifact_path)
    log_peak_memory()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
