"""
train_gpt.py: a single-file trainer for the OpenAI "parameter golf" challenge, with a *valid* n-gram mixer.

One run trains a small GPT (<= 10 min on 8xH100) together with a gate that mixes it with exact, normalized
n-gram experts (ngram_mixer.py), quantizes and zstd-compresses the model into a <= 16,000,000-byte artifact,
reloads that artifact and scores FineWeb validation in bits per byte, twice:
  final_<quant>_roundtrip_exact   the reloaded model alone, sliding-window eval
  final_ngram_ttt_exact           + a causal n-gram cache and test-time training, score-then-update

  torchrun --standalone --nproc_per_node=8 train_gpt.py                  # competition run (8xH100)
  set -a; . configs/sample_cpu.env; set +a; python train_gpt.py           # tiny CPU run on the bundled sample

Every knob is an environment variable (class Hyperparameters). The validity rules are stated in EVALUATION.
Hard cap: 1500 lines.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import io
import math
import os
import random
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
from ngram_mixer import (ExpertCounts, NgramTables, expert_features, mixture_logprob, mixture_weights,
                         smoothed_probs)

# -----------------------------
# HYPERPARAMETERS
# -----------------------------
# Defaults are the challenge baseline (9 layers x 512, 8 heads / 4 KV heads, MLP 2x relu^2, tied embeddings,
# vocab 1024, 524,288 tokens/step at seq 1024, 10-minute cap) plus the n-gram mixer and its evaluation.


class Hyperparameters:
    """Every knob of a run, read from the environment when constructed (so tools can set it first)."""

    def __init__(self) -> None:
        # Data and run identity.
        self.data_path = os.environ.get("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.tokenizer_path = os.environ.get("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        self.run_id = os.environ.get("RUN_ID", "")
        self.seed = int(os.environ.get("SEED", 1337))

        # Training length and batch.
        self.iterations = int(os.environ.get("ITERATIONS", 20000))
        self.max_wallclock_seconds = float(os.environ.get("MAX_WALLCLOCK_SECONDS", 600.0))
        self.warmup_steps = int(os.environ.get("WARMUP_STEPS", 20))
        self.warmdown_iters = int(os.environ.get("WARMDOWN_ITERS", 1200))
        self.train_batch_tokens = int(os.environ.get("TRAIN_BATCH_TOKENS", 524_288))
        self.train_seq_len = int(os.environ.get("TRAIN_SEQ_LEN", 1024))
        self.train_log_every = int(os.environ.get("TRAIN_LOG_EVERY", 200))
        self.val_loss_every = int(os.environ.get("VAL_LOSS_EVERY", 1000))
        self.val_batch_size = int(os.environ.get("VAL_BATCH_SIZE", 524_288))
        self.val_max_tokens = int(os.environ.get("VAL_MAX_TOKENS", 0))
        self.compile = bool(int(os.environ.get("COMPILE", 1)))

        # Model shape.
        self.vocab_size = int(os.environ.get("VOCAB_SIZE", 1024))
        self.num_layers = int(os.environ.get("NUM_LAYERS", 9))
        self.model_dim = int(os.environ.get("MODEL_DIM", 512))
        self.num_heads = int(os.environ.get("NUM_HEADS", 8))
        self.num_kv_heads = int(os.environ.get("NUM_KV_HEADS", 4))
        self.mlp_mult = int(os.environ.get("MLP_MULT", 2))
        self.rope_base = float(os.environ.get("ROPE_BASE", 10000.0))
        self.logit_softcap = float(os.environ.get("LOGIT_SOFTCAP", 30.0))
        self.qk_gain_init = float(os.environ.get("QK_GAIN_INIT", 1.5))
        self.tied_embed_init_std = float(os.environ.get("TIED_EMBED_INIT_STD", 0.005))

        # Optimizer: Muon for block matrices, Adam for the embedding, scalars and the gate.
        self.tied_embed_lr = float(os.environ.get("TIED_EMBED_LR", 0.05))
        self.matrix_lr = float(os.environ.get("MATRIX_LR", 0.04))
        self.scalar_lr = float(os.environ.get("SCALAR_LR", 0.04))
        self.muon_momentum = float(os.environ.get("MUON_MOMENTUM", 0.95))
        self.muon_momentum_warmup_start = float(os.environ.get("MUON_MOMENTUM_WARMUP_START", 0.85))
        self.muon_momentum_warmup_steps = int(os.environ.get("MUON_MOMENTUM_WARMUP_STEPS", 500))
        self.muon_backend_steps = int(os.environ.get("MUON_BACKEND_STEPS", 5))
        self.beta1 = float(os.environ.get("BETA1", 0.9))
        self.beta2 = float(os.environ.get("BETA2", 0.95))
        self.adam_eps = float(os.environ.get("ADAM_EPS", 1e-8))
        self.grad_clip_norm = float(os.environ.get("GRAD_CLIP_NORM", 0.0))

        # N-gram mixer: frozen tables from training tokens during training, a score-then-update cache at eval.
        self.ngram = bool(int(os.environ.get("NGRAM", 1)))
        self.ngram_max_order = int(os.environ.get("NGRAM_MAX_ORDER", 7))
        self.ngram_prefill_tokens = int(os.environ.get("NGRAM_PREFILL_TOKENS", 23_000_000))
        # 1 for the smoothed experts: on the sample, 2.1133 BPB against 2.1548 at 2 (README, Experts)
        self.ngram_min_count = int(os.environ.get("NGRAM_MIN_COUNT", 1))
        self.ngram_neural_floor = float(os.environ.get("NGRAM_NEURAL_FLOOR", 0.05))
        self.ngram_loss_weight = float(os.environ.get("NGRAM_LOSS_WEIGHT", 0.1))
        self.ngram_gate_lr = float(os.environ.get("NGRAM_GATE_LR", 0.004))
        # Absolute discount of the smoothed experts (bench/experts_bench.py: fitted 0.871 on the sample's first 20%).
        self.ngram_discount = float(os.environ.get("NGRAM_DISCOUNT", 0.87))

        # Quantization, evaluation, test-time training.
        self.quant_bits = int(os.environ.get("QUANT_BITS", 8))
        self.eval_stride = int(os.environ.get("EVAL_STRIDE", 64))
        self.eval_chunk_tokens = int(os.environ.get("EVAL_CHUNK_TOKENS", 32768))
        self.eval_artifact = os.environ.get("EVAL_ARTIFACT", "")
        self.ttt = bool(int(os.environ.get("TTT", 1)))
        self.ttt_epochs = int(os.environ.get("TTT_EPOCHS", 3))
        self.ttt_lr = float(os.environ.get("TTT_LR", 0.002))
        self.ttt_momentum = float(os.environ.get("TTT_MOMENTUM", 0.9))
        # Cosine decay of the TTT learning rate across chunks and a gradient-norm clip (PR #1493's recipe).
        self.ttt_cosine = bool(int(os.environ.get("TTT_COSINE", 1)))
        self.ttt_grad_clip = float(os.environ.get("TTT_GRAD_CLIP", 1.0))
        self.audit_positions = int(os.environ.get("AUDIT_POSITIONS", 256))
        # Per-target scores of the final pass (npz), for paired comparisons (records/compare.py).
        self.eval_dump = os.environ.get("EVAL_DUMP", "")

    @property
    def ngram_orders(self) -> tuple[int, ...]:
        """The one answer to "is the mixer on": its n-gram orders; empty = no tables, no cache, no gate."""
        return tuple(range(2, self.ngram_max_order + 1)) if self.ngram else ()


# The micro-batches of one optimizer step, summed over all processes. Keeping this fixed makes the global batch,
# and so the losses, independent of how many processes share the work (as in the challenge baseline).
MICRO_BATCHES_PER_STEP = 8
ARTIFACT_CAP_BYTES = 16_000_000
# Legality audit bounds: |sum_v p(v) - 1| (float32 scores summed in float64 stay near 1e-7) and the log-probability
# gaps, gold vs scored and true vs perturbed future (0 up to float32 rounding when the scores are valid).
AUDIT_MAX_SUM_ERR = 1e-4
AUDIT_MAX_LOGP_ERR = 1e-5


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
    need(args.quant_bits in (6, 8), f"QUANT_BITS={args.quant_bits} must be 6 or 8")
    need(args.model_dim % args.num_heads == 0 and (args.model_dim // args.num_heads) % 2 == 0,
         f"MODEL_DIM={args.model_dim} / NUM_HEADS={args.num_heads} must be an even head dim (RoPE)")
    need(args.num_heads % args.num_kv_heads == 0,
         f"NUM_HEADS={args.num_heads} must be a multiple of NUM_KV_HEADS={args.num_kv_heads}")
    need(args.ngram_max_order >= 2, f"NGRAM_MAX_ORDER={args.ngram_max_order} must be >= 2")
    need(0.0 <= args.ngram_neural_floor <= 1.0, f"NGRAM_NEURAL_FLOOR={args.ngram_neural_floor} must be in [0, 1]")
    need(0.0 < args.ngram_discount <= 1.0, f"NGRAM_DISCOUNT={args.ngram_discount} must be in (0, 1]")
    need(args.logit_softcap > 0, f"LOGIT_SOFTCAP={args.logit_softcap} must be positive")
    need(args.iterations >= 0 and args.warmup_steps >= 0, "ITERATIONS and WARMUP_STEPS must be >= 0")


# -----------------------------
# MUON
# -----------------------------
# Orthogonalized momentum for 2-D weights, from modded-nanogpt (https://kellerjordan.github.io/posts/muon/).


def zeropower_via_newtonschulz5(grad: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    # Quintic Newton-Schulz iteration whose coefficients push all singular values towards 1 in a few steps;
    # bf16 is accurate enough for that on GPU, the CPU keeps fp32 (its bf16 matmuls are slow).
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = grad.to(torch.bfloat16 if grad.is_cuda else torch.float32)
    x = x / (x.norm() + eps)
    transposed = grad.size(0) > grad.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalized. Parameters are dealt round-robin to ranks; each
    rank orthogonalizes its share and one all-reduce of a flat buffer gives every rank every update."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = zeropower_via_newtonschulz5(p.grad.add(buf, alpha=group["momentum"]),
                                                         group["backend_steps"])
                    # Rectangular matrices get a larger step so their RMS update matches square ones.
                    update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    updates[offset:offset + p.numel()] = update.reshape(-1).float()
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates)
            offset = 0
            for p in params:
                p.add_(updates[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


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
    """Per-token byte counts for BPB (the challenge rule): (base bytes, starts with '▁', is control/unk/unused)."""
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
    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = torch.outer(torch.arange(seq_len, device=self.inv_freq.device).float(), self.inv_freq)
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, kv_dim, bias=False)
        self.c_v = nn.Linear(dim, kv_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj.zero_init = True
        # A learned per-head temperature on the normalized queries (baseline's q_gain).
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        self.rotary = Rotary(self.head_dim, rope_base)

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
        return self.proj(y.transpose(1, 2).reshape(bsz, seq_len, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.fc = nn.Linear(dim, mlp_mult * dim, bias=False)
        self.proj = nn.Linear(mlp_mult * dim, dim, bias=False)
        self.proj.zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, rope_base: float,
                 qk_gain_init: float):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(), RMSNorm()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Each block may mix the embedding x0 back into its input (baseline's resid_mix).
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        x = self.resid_mix[0].to(x.dtype) * x + self.resid_mix[1].to(x.dtype) * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The baseline GPT (U-net skips between the first and second half of the blocks, tied embeddings,
    tanh logit soft-cap) plus, when `num_experts` > 0, a gate Linear(model_dim -> 1 + num_experts) that weighs
    the neural distribution (slot 0) against the n-gram experts."""

    def __init__(self, vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int,
                 mlp_mult: int, rope_base: float, logit_softcap: float, qk_gain_init: float,
                 tied_embed_init_std: float, num_experts: int = 0, neural_floor: float = 0.05,
                 mixture_loss_weight: float = 0.1, num_expert_features: int = 0):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.neural_floor, self.mixture_loss_weight = neural_floor, mixture_loss_weight
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        # The first half of the blocks stores skips that the second half adds back in reverse order.
        self.num_encoder_layers = num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(self.num_encoder_layers, model_dim))
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, num_kv_heads, mlp_mult, rope_base, qk_gain_init)
                                    for _ in range(num_layers))
        self.final_norm = RMSNorm()
        self.gate = nn.Linear(model_dim, 1 + num_experts) if num_experts else None
        # The experts' prefix-only count features (expert_inputs) shift the gate's logits.
        self.gate_features = nn.Linear(num_expert_features, 1 + num_experts, bias=False) \
            if num_experts and num_expert_features else None
        nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
        if self.gate is not None:
            # Start by trusting the neural model: zero weights, bias +2 on the neural slot (PR #834's init).
            nn.init.zeros_(self.gate.weight)
            with torch.no_grad():
                self.gate.bias.zero_()[0] = 2.0
        if self.gate_features is not None:
            # zero: training starts from the gate of h_t alone, as before the features existed
            nn.init.zeros_(self.gate_features.weight)

    def layer_states(self, input_ids: Tensor) -> list[Tensor]:  # [B, T] int64 -> per layer [B, T, D]
        """The residual stream after each layer, in execution order (analysis tools probe these)."""
        x = x0 = F.rms_norm(self.tok_emb(input_ids), (self.tok_emb.embedding_dim,))
        skips, states = [], []
        for i, block in enumerate(self.blocks):
            decoder_index = i - self.num_encoder_layers
            if decoder_index >= 0 and skips:
                x = x + self.skip_weights[decoder_index].to(x.dtype) * skips.pop()
            x = block(x, x0)
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

    def gate_logits(self, h: Tensor, features: Tensor | None = None) -> Tensor:
        """[..., D] hidden states and [..., F] expert features (expert_inputs) -> [..., 1 + K] float32 logits."""
        logits = self.gate(h).float()
        if features is None or self.gate_features is None:
            return logits
        return logits + self.gate_features(features.to(self.gate_features.weight.dtype)).float()

    def forward(self, input_ids: Tensor, target_ids: Tensor, expert_probs: Tensor | None = None,
                expert_valid: Tensor | None = None, expert_features: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Training loss = neural CE + weight x mixture NLL. Returns (loss, neural CE, mixture NLL);
        expert_probs / expert_valid are [K, B*T] and expert_features [B*T, F] for the targets (expert_inputs),
        from n-gram counts that exclude the targets and everything after them."""
        h = self.hidden(input_ids).reshape(-1, self.tok_emb.embedding_dim)
        # One log_softmax serves the CE and the mixture.
        neural_lp = self.logits(h).log_softmax(-1).gather(1, target_ids.reshape(-1, 1)).squeeze(1)
        ce = -neural_lp.mean()
        if expert_probs is None:
            return ce, ce.detach(), ce.detach()
        weights = mixture_weights(self.gate_logits(h, expert_features), expert_valid, self.neural_floor)
        mix_nll = -mixture_logprob(neural_lp, expert_probs, expert_valid, weights).mean()
        return ce + self.mixture_loss_weight * mix_nll, ce.detach(), mix_nll.detach()


def build_model(args: Hyperparameters, device: torch.device) -> GPT:
    return GPT(args.vocab_size, args.num_layers, args.model_dim, args.num_heads, args.num_kv_heads, args.mlp_mult,
               args.rope_base, args.logit_softcap, args.qk_gain_init, args.tied_embed_init_std,
               num_experts=len(args.ngram_orders), neural_floor=args.ngram_neural_floor,
               mixture_loss_weight=args.ngram_loss_weight,
               num_expert_features=expert_feature_count(len(args.ngram_orders))).to(device)


# -----------------------------
# N-GRAM EXPERTS
# -----------------------------


def new_ngram_tables(args: Hyperparameters, device: torch.device) -> NgramTables:
    """Empty count tables: the unigram (the smoothed experts' common base, not an expert itself) and the experts'
    orders. Training prefills them; evaluation starts one empty (the cache)."""
    return NgramTables(args.vocab_size, (1,) + args.ngram_orders, device=device)


def expert_feature_count(num_experts: int) -> int:
    # log context count and log distinct continuations per expert, and the longest order seen
    return 2 * num_experts + 1


def expert_inputs(tables: NgramTables, stream: Tensor, positions: Tensor, min_count: int,
                  targets: Tensor | None = None, in_table: Tensor | None = None, *,
                  discount: float) -> tuple[Tensor, Tensor, Tensor]:
    """The experts' inputs at each position: (p_k(target) [K, P] float32, valid [K, P] bool, features [P, F]
    float32), the one place where n-gram counts become what the gate mixes (training, evaluation and the
    legality audit all call it). Experts are the tables' orders >= 2.

    Counts (NgramTables.counts): at evaluation, the cache holds stream[0:cache.num_tokens] and a target at t also
    counts the chunk's own tokens before t; in training (in_table: [K_tables, L] bool, which of the stream's
    n-grams the frozen tables hold) the table's own n-grams at or after t are left out, so the gate trains on
    counts that look like the cache's. The target at t is stream[t], or targets[p] when given (then the stream may
    end right before t, for the audit's candidate enumeration).
    Expert k is the order-n interpolated absolute-discounting distribution backing off through the lower orders
    to the uniform (ngram_mixer.smoothed_probs), a full distribution > 0 summing to 1. It is valid where its
    context was seen at least `min_count` times; the gate ignores the others. Features depend on the context
    only (never on the target), so they are the same for every candidate token."""
    counts = tables.counts(stream, positions, targets, in_table=in_table)
    experts = [k for k, n in enumerate(tables.orders) if n >= 2]
    expert_counts = ExpertCounts(counts.context[experts], counts.pair[experts], counts.distinct[experts])
    probs = smoothed_probs(counts, tables.vocab_size, discount)[experts].float()
    valid = expert_counts.context >= max(min_count, 1)
    features = expert_features(expert_counts, tuple(tables.orders[k] for k in experts))
    return probs, valid, features


def table_mask(orders: tuple[int, ...], stream_positions: Tensor, prefill_tokens: int) -> Tensor:
    """[K, L] bool: where the n-gram ending at these train-stream positions was counted into the frozen tables.
    The tables hold stream[0:prefill_tokens]; an n-gram whose window wraps past the end of the stream back to its
    start (position < n-1) was never counted."""
    order = torch.tensor(orders, device=stream_positions.device)[:, None]
    return (stream_positions < prefill_tokens)[None, :] & (stream_positions[None, :] >= order - 1)


# -----------------------------
# EVALUATION
# -----------------------------
# Every target t in [1, N) of the val stream is scored exactly once, from a distribution over the whole vocabulary
# that depends only on tokens < t: the model reads a causal window, the n-gram cache holds only tokens of earlier
# chunks, and test-time training (TTT) learns from a chunk only after all its targets are scored. The legality
# audit checks this at random targets and the run exits 4 when it fails (see score_span and LegalityAudit).


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
    ngram_discount: float = 0.87
    # Every target TTT has learned from is < this index; scoring a target at or above it would be a C3 breach.
    ttt_trained_until: int = 0


def forward_windows(setup: EvalSetup, stream: Tensor, start: Tensor, lo: Tensor, hi: Tensor):
    """The model on windows [start, start + seq_len) of `stream`: (target positions [P], hidden states [P, D],
    neural log-probabilities [P, V] float32) of the targets lo <= t < hi each window scores."""
    input_index = (start[:, None] + torch.arange(setup.seq_len, device=stream.device)).clamp(max=len(stream) - 1)
    target_index = input_index + 1
    # Past a short window's end the inputs are later tokens; causal attention keeps them out of its targets.
    scored = (target_index >= lo[:, None]) & (target_index < hi[:, None])
    with setup.autocast():
        h = setup.hidden_fn(stream[input_index])[scored]
        logits = setup.model.logits(h)
    return target_index[scored], h, logits.log_softmax(-1)


def mix(setup: EvalSetup, cache: NgramTables | None, h: Tensor, neural_lp: Tensor, stream: Tensor,
        positions: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The scoring rule: log p(target) [P] of the full system and its mixing weights [P, 1+K] (None without the
    cache), from hidden states h [P, D] and the neural log-probabilities of the targets [P]."""
    if cache is None:
        return neural_lp, None
    probs, valid, features = expert_inputs(cache, stream, positions, setup.min_count, targets,
                                           discount=setup.ngram_discount)
    with setup.autocast():
        gate_logits = setup.model.gate_logits(h, features)
    weights = mixture_weights(gate_logits, valid, setup.model.neural_floor)
    return mixture_logprob(neural_lp, probs, valid, weights), weights


class LegalityAudit:
    """Checks, at given val targets, that the score is a probability computed from the prefix alone:
    - normalization: the production rule applied to every candidate token v at t (the stream cut right before t,
      so the experts' validity is recomputed per candidate) sums to 1 (max_abs_sum_err), and its value at the
      gold token equals the scored log-probability (max_gold_logp_err);
    - causality: t's window re-scored through the production rule with every token after t replaced by random ids
      gives the same log-probability (max_future_logp_delta). Both windows run with identical shapes, so the
      delta is exactly 0 unless the score reads the future.
    It cannot see a leak through state (the cache, TTT): score_span checks those invariants on every chunk."""

    def __init__(self, positions: Tensor, seed: int):
        self.positions = positions
        self.generator = torch.Generator(device=positions.device).manual_seed(seed)
        self.count, self.sum_err, self.gold_err, self.future_delta = 0, 0.0, 0.0, 0.0

    def check(self, setup: EvalSetup, cache: NgramTables | None, windows: tuple[Tensor, Tensor, Tensor],
              positions: Tensor, h: Tensor, log_probs: Tensor, scored_lp: Tensor) -> None:
        tokens, vocab = setup.tokens, log_probs.size(1)
        rows = torch.nonzero(torch.isin(positions, self.positions)).flatten()
        if len(rows) == 0:
            return
        candidates = torch.arange(vocab, device=tokens.device)
        segments, perturbed_streams = [], []
        for row in rows.tolist():
            t = int(positions[row])
            candidate_lp, _ = mix(setup, cache, h[row].expand(vocab, -1), log_probs[row], tokens[:t],
                                  torch.full((vocab,), t, device=tokens.device), candidates)
            self.sum_err = max(self.sum_err, abs(float(candidate_lp.double().exp().sum()) - 1.0))
            self.gold_err = max(self.gold_err, abs(float(candidate_lp[tokens[t]]) - float(scored_lp[row])))
            # t's window, cut out of the true stream and of a copy whose tokens after t are random
            start, lo, hi = windows
            first = int(start[torch.nonzero((lo <= t) & (t < hi))[0, 0]])
            end = min(first + setup.seq_len + 1, len(tokens))
            perturbed = tokens[:end].clone()
            perturbed[t + 1:] = torch.randint(0, vocab, (end - t - 1,), generator=self.generator,
                                              device=tokens.device)
            perturbed_streams.append(perturbed)
            segments += [(tokens[first:end], t - first), (perturbed[first:end], t - first)]
        # all true and perturbed windows in one call, so both of a pair run through identical kernels
        offsets = torch.tensor([0] + [len(seg) for seg, _ in segments], device=tokens.device).cumsum(0)
        target = offsets[:-1] + torch.tensor([at for _, at in segments], device=tokens.device)
        seg_positions, seg_h, seg_log_probs = forward_windows(setup, torch.cat([seg for seg, _ in segments]),
                                                              offsets[:-1], target, target + 1)
        for i, row in enumerate(rows.tolist()):
            t = positions[row:row + 1]
            pair_lp = [mix(setup, cache, seg_h[k:k + 1], seg_log_probs[k, tokens[t]], stream, t)[0]
                       for k, stream in ((2 * i, tokens), (2 * i + 1, perturbed_streams[i]))]
            self.future_delta = max(self.future_delta, float((pair_lp[0] - pair_lp[1]).abs().max()))
        self.count += len(rows)

    def reduce(self) -> tuple[int, float, float, float]:
        """(positions, max_abs_sum_err, max_gold_logp_err, max_future_logp_delta) over all ranks."""
        stats = torch.tensor([self.sum_err, self.gold_err, self.future_delta], dtype=torch.float64,
                             device=self.positions.device)
        count = all_reduce(torch.tensor([float(self.count)], dtype=torch.float64, device=stats.device))
        stats = all_reduce(stats, dist.ReduceOp.MAX if dist.is_available() and dist.is_initialized() else None)
        return int(count[0]), *stats.tolist()


def audit_fails(stats: tuple[int, float, float, float]) -> bool:
    count, sum_err, gold_err, future_delta = stats
    return count == 0 or sum_err > AUDIT_MAX_SUM_ERR or gold_err > AUDIT_MAX_LOGP_ERR or \
        future_delta > AUDIT_MAX_LOGP_ERR


class TargetRecord:
    """Per-target results of one pass, in val order (index t - 1): full-system NLL, neural NLL, mixing weights."""

    def __init__(self, n_targets: int, n_weights: int, device: torch.device):
        self.nll = torch.zeros(n_targets, dtype=torch.float64, device=device)
        self.neural_nll = torch.zeros_like(self.nll)
        self.weights = torch.zeros(n_targets, n_weights, dtype=torch.float32, device=device)

    def store(self, positions: Tensor, neural_lp: Tensor, mixed_lp: Tensor, weights: Tensor | None) -> None:
        self.nll[positions - 1] = -mixed_lp.double()
        self.neural_nll[positions - 1] = -neural_lp.double()
        if weights is not None:
            self.weights[positions - 1] = weights.float()

    def all_reduce(self) -> None:
        # every target was written by exactly one rank, the others hold zeros there
        for tensor in (self.nll, self.neural_nll, self.weights):
            all_reduce(tensor)


def score_span(setup: EvalSetup, first: int, end: int, cache: NgramTables | None = None,
               audit: LegalityAudit | None = None, record: TargetRecord | None = None) -> Tensor:
    """Score this rank's share of the windows covering targets [first, end); returns [neural NLL, system NLL,
    bytes, tokens] (float64 sums). With `cache`, the n-gram experts join through the model's gate; the cache must
    hold only tokens < first and TTT must not have learned from any target >= first (checked here, where the
    scores are made: a violation raises)."""
    tokens, device = setup.tokens, setup.tokens.device
    if cache is not None:
        held = cache.num_tokens
        tail = tokens[max(0, held - cache.tail.numel()):held]
        if held > first or not torch.equal(cache.tail, tail):
            raise RuntimeError(f"causality violated: scoring targets from {first} with a cache of {held} tokens "
                               "whose last tokens are not the val stream's (the cache may only hold scored tokens)")
    if setup.ttt_trained_until > first:
        raise RuntimeError(f"causality violated: scoring targets from {first} after TTT learned targets up to "
                           f"{setup.ttt_trained_until - 1}")
    start, lo, hi = (t.to(device) for t in window_schedule(first, end, setup.seq_len, setup.stride))
    n = len(start)
    share = slice(n * setup.rank // setup.world_size, n * (setup.rank + 1) // setup.world_size)
    start, lo, hi = start[share], lo[share], hi[share]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for i in range(0, len(start), setup.windows_per_batch):
        windows = tuple(w[i:i + setup.windows_per_batch] for w in (start, lo, hi))
        positions, h, log_probs = forward_windows(setup, tokens, *windows)
        targets = tokens[positions]
        neural_lp = log_probs.gather(1, targets[:, None]).squeeze(1)
        mixed_lp, weights = mix(setup, cache, h, neural_lp, tokens, positions)
        if audit is not None:
            audit.check(setup, cache, windows, positions, h, log_probs, mixed_lp)
        if record is not None:
            record.store(positions, neural_lp, mixed_lp, weights)
        n_bytes = count_target_bytes(tokens[positions - 1], targets, setup.luts)
        # Sums in float64 and one division at the end (BPB = sum NLL / ln 2 / sum bytes), as nanochat does.
        sums += torch.stack((-neural_lp.double().sum(), -mixed_lp.double().sum(), n_bytes.double().sum(),
                             torch.tensor(float(len(positions)), dtype=torch.float64, device=device)))
    return sums


def all_reduce(tensor: Tensor, op=None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


@dataclass
class EvalResult:
    val_loss: float
    val_bpb: float
    neural_val_loss: float
    scored_tokens: int
    scored_bytes: int
    time_ms: dict
    audit: tuple[int, float, float, float] | None = None
    record: TargetRecord | None = None


def summarize(sums: Tensor, time_ms: dict, audit=None, record=None) -> EvalResult:
    neural_nll, nll, n_bytes, n_tokens = all_reduce(sums).tolist()
    if record is not None:
        record.all_reduce()
    return EvalResult(nll / n_tokens, nll / math.log(2.0) / n_bytes, neural_nll / n_tokens, int(n_tokens),
                      int(n_bytes), time_ms, audit, record)


def eval_val(setup: EvalSetup, record: TargetRecord | None = None) -> EvalResult:
    """The neural model alone over every val target (sliding windows of the setup's stride)."""
    was_training = setup.model.training
    setup.model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        sums = score_span(setup, 1, len(setup.tokens), record=record)
    setup.model.train(was_training)
    return summarize(sums, dict(total=1000.0 * (time.perf_counter() - t0)), record=record)


def chunk_bounds(n_tokens: int, chunk_tokens: int) -> list[int]:
    """Target boundaries 1 = b0 < b1 < ... = n_tokens of the score-then-update chunks."""
    return list(range(1, n_tokens, chunk_tokens)) + [n_tokens]


def ttt_on_chunk(setup: EvalSetup, optimizer: torch.optim.Optimizer, params: list[Tensor], first: int,
                 end: int, epochs: int, lr: float, grad_clip: float) -> None:
    """Test-time training on targets [first, end), which have all been scored already: `epochs` SGD steps on the
    chunk's CE, the chunk's sequences split across ranks and the gradients summed so all ranks stay identical."""
    seq_len = min(setup.seq_len, end - first)
    n_seqs = (end - first) // seq_len
    starts = (first - 1 + seq_len * torch.arange(n_seqs, device=setup.tokens.device))[setup.rank::setup.world_size]
    index = starts[:, None] + torch.arange(seq_len, device=starts.device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    setup.ttt_trained_until = max(setup.ttt_trained_until, end)
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
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    setup.model.eval()


@dataclass
class TTTConfig:
    epochs: int = 0  # 0 = no test-time training
    lr: float = 0.002
    momentum: float = 0.9
    cosine: bool = True
    grad_clip: float = 1.0


def eval_ngram_ttt(setup: EvalSetup, bounds: list[int], cache: NgramTables | None, ttt: TTTConfig,
                   audit: LegalityAudit | None = None, record: TargetRecord | None = None) -> EvalResult:
    """Score-then-update over the chunks [bounds[i], bounds[i+1]): score every target of the chunk (neural +
    cache experts + gate), THEN extend the cache with the chunk, THEN train on it (TTT). `cache` must start empty
    (it is identical on all ranks); nothing of a chunk reaches the cache or the weights before it is scored."""
    tokens, device = setup.tokens, setup.tokens.device
    # TTT adapts every transformer weight; the gate has no CE gradient and stays as trained.
    params = [p for name, p in setup.model.named_parameters() if not name.startswith(("gate.", "gate_features."))]
    optimizer = torch.optim.SGD(params, lr=ttt.lr, momentum=ttt.momentum) if ttt.epochs > 0 else None
    for p in params:
        # Dense zero grads on every rank, even one without sequences in a chunk, so the all-reduce always matches.
        p.grad = torch.zeros_like(p) if optimizer else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    time_ms = dict(score=0.0, cache=0.0, ttt=0.0)
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
            return score_span(setup, first, end, cache, audit, record)

    n_learn = len(bounds) - 2  # the last chunk is never learned from
    for i, (first, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        sums += timed("score", score, first, end)
        if i == n_learn:
            break  # nothing is left to score, so the last chunk need not be learned from
        if cache is not None:
            timed("cache", cache.extend, tokens[cache.num_tokens:end])
        if optimizer is not None:
            lr = ttt.lr * (0.5 * (1 + math.cos(math.pi * i / n_learn)) if ttt.cosine else 1.0)
            timed("ttt", ttt_on_chunk, setup, optimizer, params, first, end, ttt.epochs, lr, ttt.grad_clip)
    time_ms["total"] = sum(time_ms.values())
    return summarize(sums, time_ms, audit.reduce() if audit is not None else None, record)


def sample_audit_positions(n_tokens: int, count: int, seed: int, device: torch.device) -> Tensor:
    """Random val targets (same on every rank) at which the legality audit checks the scores."""
    generator = torch.Generator().manual_seed(seed)
    return torch.unique(torch.randint(1, n_tokens, (count,), generator=generator)).to(device)


def write_eval_dump(path: Path, record: TargetRecord, result: EvalResult, tokens: Tensor, luts, bos_id: int,
                    run_id: str) -> None:
    """EVAL_DUMP: per-target arrays in val order (t = 1..N-1) and the pass's scores, as an npz file. Its
    nll.sum() / (ln 2 * bytes.sum()) is the logged val_bpb up to float64 summation order."""
    n_bytes = count_target_bytes(tokens[:-1], tokens[1:], luts)
    doc_id = torch.cumsum((tokens == bos_id).long(), 0)[1:] - 1
    arrays = dict(nll=record.nll, neural_nll=record.neural_nll, bytes=n_bytes, doc_id=doc_id,
                  positions=torch.arange(1, len(tokens), device=tokens.device), gate_weights=record.weights)
    np.savez(path, **{k: v.cpu().numpy() for k, v in arrays.items()}, val_bpb=np.float64(result.val_bpb),
             val_loss=np.float64(result.val_loss), run_id=np.str_(run_id))


# -----------------------------
# QUANTIZATION + COMPRESSION
# -----------------------------
# The score is always that of the artifact: quantize, compress, write, read back, decompress, dequantize, eval.

QUANT_MIN_NUMEL = 65_536  # smaller tensors (norm scales, residual mixes, the gate) stay fp16: few bytes, touchy
ZSTD_LEVEL = 22


def quantize_state_dict(state_dict: dict[str, Tensor], bits: int) -> dict:
    """Per-row symmetric quantization of the large matrices to [-qmax, qmax] (int8 storage; int6 values compress
    better) with one fp16 scale per row; every other tensor is stored as fp16."""
    qmax = 2 ** (bits - 1) - 1
    blob = {"__format__": f"int{bits}_zstd_v1", "quantized": {}, "scales": {}, "float16": {}, "dtypes": {}}
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().float()
        blob["dtypes"][name] = str(tensor.dtype).removeprefix("torch.")
        if t.ndim == 2 and t.numel() >= QUANT_MIN_NUMEL:
            # The clamp keeps all-zero rows finite; quantizing with the fp16-rounded scale makes dequant exact.
            scale = (t.abs().amax(dim=1) / qmax).clamp_min(2.0 ** -14).half()
            blob["quantized"][name] = torch.round(t / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int8)
            blob["scales"][name] = scale
        else:
            blob["float16"][name] = t.half()
    return blob


def dequantize_state_dict(blob: dict) -> dict[str, Tensor]:
    tensors = {name: q.float() * blob["scales"][name].float()[:, None] for name, q in blob["quantized"].items()}
    tensors.update((name, t.float()) for name, t in blob["float16"].items())
    return {name: tensors[name].to(getattr(torch, dtype)) for name, dtype in blob["dtypes"].items()}


def compress_artifact(blob: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(buffer.getvalue())


def load_artifact(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(path.read_bytes())
    except zstandard.ZstdError as err:
        raise ValueError(f"{path}: not a zstd-compressed artifact ({err})") from None
    blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if blob.get("__format__") not in ("int8_zstd_v1", "int6_zstd_v1"):
        raise ValueError(f"{path}: unknown artifact format {blob.get('__format__')!r}")
    return blob


def model_from_artifact(args: Hyperparameters, path: Path, device: torch.device) -> GPT:
    """A fresh model built from the artifact's bytes alone, as the evaluation and the analysis tools load it."""
    model = build_model(args, device)
    model.load_state_dict(dequantize_state_dict(load_artifact(Path(path))))
    return model


def check_artifact_size(total_bytes: int) -> bool:
    return total_bytes <= ARTIFACT_CAP_BYTES


# -----------------------------
# TRAINING
# -----------------------------
# main() runs the phases in order: start_run -> train_model (n-gram prefill, warmup, the timed loop) ->
# export_artifact -> evaluate_artifact. They share one Run: settings, process layout, logging and the val data.


@dataclass
class Run:
    args: Hyperparameters
    rank: int
    world_size: int
    device: torch.device
    run_id: str
    log_path: Path
    artifact_path: Path
    code_bytes: int
    bos_id: int
    luts: tuple
    val_tokens: Tensor

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compile_model(self) -> bool:
        return self.args.compile and self.use_cuda

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_cuda else nullcontext()

    def sync(self) -> None:
        if self.use_cuda:
            torch.cuda.synchronize()

    def log(self, msg: str, console: bool = True) -> None:
        if self.master:
            if console:
                print(msg, flush=True)
            with open(self.log_path, "a", encoding="utf-8") as f:
                print(msg, file=f)

    def log_peak_memory(self) -> None:
        if self.use_cuda:
            self.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                     f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
        else:
            self.log(f"peak memory rss: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


def start_run(args: Hyperparameters) -> Run:
    """Processes, device, run id, the log header (source, versions, hyperparameters), tokenizer and val tokens."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    validate_hyperparameters(args, world_size)
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
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
    if rank == 0:
        log_path.parent.mkdir(exist_ok=True)
    code_files = [Path(__file__).resolve(), Path(ngram_mixer.__file__).resolve()]
    code = [f.read_bytes() for f in code_files]
    sp = load_tokenizer(args.tokenizer_path, args.vocab_size)
    run = Run(args, rank, world_size, device, run_id, log_path, artifact_path, sum(len(c) for c in code),
              int(sp.bos_id()), build_byte_luts(sp, args.vocab_size, device),
              load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens).to(device))
    for path, source in zip(code_files, code):
        run.log(f"===== {path.name} =====\n{source.decode('utf-8')}", console=False)
    run.log(f"Running Python {sys.version.split()[0]}, PyTorch {torch.__version__}, "
            f"{torch.cuda.get_device_name(device) if use_cuda else 'CPU'}", console=False)
    run.log(f"run_id:{run_id}")
    for name, value in sorted(vars(args).items()):
        run.log(f"hparam {name}:{value}")
    run.log(f"world_size:{world_size} grad_accum_steps:{MICRO_BATCHES_PER_STEP // world_size} device:{device} "
            f"torch:{torch.__version__} compile:{run.compile_model}")
    run.log(f"code_sha256:{hashlib.sha256(b''.join(code)).hexdigest()}")
    tokenizer_sha = hashlib.sha256(Path(args.tokenizer_path).read_bytes()).hexdigest()
    run.log(f"tokenizer path:{args.tokenizer_path} vocab_size:{args.vocab_size} sha256:{tokenizer_sha}")
    run.log(f"val_tokens:{len(run.val_tokens)} scored_targets:{len(run.val_tokens) - 1}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return run


def build_eval_setup(run: Run, model: GPT, stride: int) -> EvalSetup:
    hidden_fn = torch.compile(model.hidden) if run.compile_model else model.hidden
    windows_per_batch = max(1, run.args.val_batch_size // (run.world_size * run.args.train_seq_len))
    return EvalSetup(model, hidden_fn, run.val_tokens, run.luts, run.args.train_seq_len, stride, windows_per_batch,
                     run.rank, run.world_size, run.args.ngram_min_count, run.autocast,
                     ngram_discount=run.args.ngram_discount)


def build_optimizers(args: Hyperparameters, model: GPT, fused: bool) -> list[torch.optim.Optimizer]:
    """Muon for the block matrices; Adam for the embedding, the scalars and the gate. Each group keeps its
    base_lr for the schedule."""
    matrix_params = [m.weight for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    matrix_ids = {id(p) for p in matrix_params}
    scalar_params = [p for p in model.blocks.parameters() if id(p) not in matrix_ids] + [model.skip_weights]
    adam_groups = [dict(params=[model.tok_emb.weight], lr=args.tied_embed_lr), dict(params=scalar_params,
                                                                                  lr=args.scalar_lr)]
    if model.gate is not None:
        gate_params = list(model.gate.parameters())
        gate_params += list(model.gate_features.parameters()) if model.gate_features is not None else []
        adam_groups.append(dict(params=gate_params, lr=args.ngram_gate_lr))
    optimizers = [torch.optim.Adam(adam_groups, betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=fused),
                  Muon(matrix_params, lr=args.matrix_lr, momentum=args.muon_momentum,
                       backend_steps=args.muon_backend_steps)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def prefill_tables(run: Run, train_files: list[Path]) -> tuple[NgramTables | None, int]:
    """Frozen n-gram tables of the first NGRAM_PREFILL_TOKENS of the train stream, identical on every rank, for
    training the gate (None without the mixer). Returns (tables, tokens counted)."""
    args = run.args
    if not args.ngram_orders:
        return None, 0
    stream = TokenStream(train_files, args.vocab_size)
    prefill_tokens = min(args.ngram_prefill_tokens, stream.total_tokens)
    tables = new_ngram_tables(args, run.device)
    # Pieces of 64M tokens bound the sort's temporary memory; chunked extends give identical tables.
    for begin in range(0, prefill_tokens, 1 << 26):
        tables.extend(stream.take(min(1 << 26, prefill_tokens - begin)).to(run.device, torch.int64))
    return tables, prefill_tokens


@dataclass
class Trainer:
    """What one training step needs: the (DDP-wrapped, compiled) model, its plain module, the optimizers, the
    data, and the frozen n-gram tables with the train-stream positions of every step's targets."""
    model: nn.Module
    base_model: GPT
    optimizers: list
    loader: DistributedTokenLoader
    tables: NgramTables | None
    prefill_tokens: int
    lookup_positions: Tensor  # [8 * local_tokens] segment positions of the step's targets, micro-batch order


def train_step(run: Run, trainer: Trainer) -> Tensor:
    """One optimizer step's forward/backward over this rank's micro-batches; returns mean [loss, CE, mix NLL]."""
    args, loader = run.args, trainer.loader
    stats = torch.zeros(3, device=run.device)
    segment, segment_position = loader.next_step()
    experts = None
    if trainer.tables is not None:
        # the segment's n-grams the frozen tables hold leave from t on; the others join before t (expert_inputs)
        stream_positions = (segment_position + torch.arange(len(segment), device=segment.device)) % \
            loader.stream.total_tokens
        experts = expert_inputs(trainer.tables, segment, trainer.lookup_positions, args.ngram_min_count,
                                in_table=table_mask(trainer.tables.orders, stream_positions, trainer.prefill_tokens),
                                discount=args.ngram_discount)
    local_tokens = loader.span - 1
    n_micro = len(loader.span_starts)
    for micro_step, start in enumerate(loader.span_starts):
        local = segment[start:start + loader.span]
        x, y = local[:-1].reshape(-1, args.train_seq_len), local[1:].reshape(-1, args.train_seq_len)
        micro = slice(micro_step * local_tokens, (micro_step + 1) * local_tokens)
        micro_experts = (experts[0][:, micro], experts[1][:, micro], experts[2][micro]) if experts else ()
        if run.distributed:
            trainer.model.require_backward_grad_sync = micro_step == n_micro - 1
        with run.autocast():
            loss, ce, mix_nll = trainer.model(x, y, *micro_experts)
        # Averaging over micro-batches (and DDP over ranks) gives the gradient of the global batch mean.
        (loss / n_micro).backward()
        stats += torch.stack((loss.detach(), ce, mix_nll)).float() / n_micro
    return stats


def optimizer_step(args: Hyperparameters, trainer: Trainer, step: int, lr_multiplier: float) -> None:
    momentum_frac = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps else 1.0
    for group in trainer.optimizers[1].param_groups:
        group["momentum"] = (1 - momentum_frac) * args.muon_momentum_warmup_start + momentum_frac * args.muon_momentum
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier
    if args.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(trainer.base_model.parameters(), args.grad_clip_norm)
    for opt in trainer.optimizers:
        opt.step()
    for opt in trainer.optimizers:
        opt.zero_grad(set_to_none=True)


def warmdown_multiplier(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Linear warmdown over the last WARMDOWN_ITERS steps, counted by iterations and, under a wallclock cap, by the
    projected time left, whichever comes first, so a run ends cooled down either way."""
    if args.warmdown_iters <= 0:
        return 1.0
    multiplier = min(1.0, max(args.iterations - step, 0) / args.warmdown_iters)
    if args.max_wallclock_seconds > 0 and step > 0:
        warmdown_ms = args.warmdown_iters * elapsed_ms / step
        multiplier = min(multiplier, max(1000.0 * args.max_wallclock_seconds - elapsed_ms, 0.0) / warmdown_ms)
    return multiplier


def build_trainer(run: Run, train_files: list[Path], tables: NgramTables | None, prefill_tokens: int) -> Trainer:
    args = run.args
    base_model = build_model(args, run.device)
    # DDP wraps the compiled module (as in the baseline); the optimizers hold the uncompiled parameters.
    compiled = torch.compile(base_model) if run.compile_model else base_model
    model = DDP(compiled, device_ids=[run.device.index] if run.use_cuda else None,
                broadcast_buffers=False) if run.distributed else compiled
    local_tokens = args.train_batch_tokens // MICRO_BATCHES_PER_STEP
    loader = DistributedTokenLoader(train_files, run.rank, run.world_size, run.device, args.vocab_size, local_tokens)
    # One n-gram lookup per step for all micro-batches: the targets are positions 1..local_tokens of each span.
    lookup_positions = (torch.tensor(loader.span_starts, device=run.device)[:, None] +
                        torch.arange(1, local_tokens + 1, device=run.device)).reshape(-1)
    return Trainer(model, base_model, build_optimizers(args, base_model, run.use_cuda), loader, tables,
                   prefill_tokens, lookup_positions)


def warm_up(run: Run, trainer: Trainer, train_files: list[Path]) -> None:
    """WARMUP_STEPS untimed steps prime torch.compile and the kernels; then the initial weights, optimizer state and
    data stream are restored, so measured training starts from the true init (as in the challenge baseline)."""
    if run.args.warmup_steps <= 0:
        return
    initial_model = copy.deepcopy(trainer.base_model.state_dict())
    initial_optimizers = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
    for warmup_step in range(run.args.warmup_steps):
        train_step(run, trainer)
        optimizer_step(run.args, trainer, 0, 1.0)
        if warmup_step < 3 or warmup_step + 1 == run.args.warmup_steps:
            run.log(f"warmup_step:{warmup_step + 1}/{run.args.warmup_steps}")
    trainer.base_model.load_state_dict(initial_model)
    for opt, state in zip(trainer.optimizers, initial_optimizers):
        opt.load_state_dict(state)
    loader = trainer.loader
    trainer.loader = DistributedTokenLoader(train_files, run.rank, run.world_size, run.device, run.args.vocab_size,
                                            loader.span - 1)


def train_model(run: Run) -> GPT:
    """Prefill the frozen n-gram tables, then train until ITERATIONS or the wallclock cap (which the prefill counts
    against); logs train and periodic (neural, non-overlapping) val lines. Returns the trained model."""
    args = run.args
    train_files = list_shards(args.data_path, "train")
    run.sync()
    t0 = time.perf_counter()
    tables, prefill_tokens = prefill_tables(run, train_files)
    run.sync()
    training_time_ms = 1000.0 * (time.perf_counter() - t0)
    if tables is not None:
        run.log(f"ngram_prefill tokens:{prefill_tokens} time:{training_time_ms:.0f}ms bytes:{tables.nbytes()}")
    trainer = build_trainer(run, train_files, tables, prefill_tokens)
    run.log(f"model_params:{sum(p.numel() for p in trainer.base_model.parameters())} "
            f"ngram_orders:{list(args.ngram_orders)}")
    warm_up(run, trainer, train_files)
    val_setup = build_eval_setup(run, trainer.base_model, args.train_seq_len)
    max_wallclock_ms = 1000.0 * args.max_wallclock_seconds if args.max_wallclock_seconds > 0 else None
    stop_after_step, step = None, 0
    run.sync()
    t0 = time.perf_counter()
    while True:
        last_step = step == args.iterations or (stop_after_step is not None and step >= stop_after_step)
        if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            run.sync()
            training_time_ms += 1000.0 * (time.perf_counter() - t0)
            result = eval_val(val_setup)
            run.log(f"step:{step}/{args.iterations} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} "
                    f"train_time:{training_time_ms:.0f}ms step_avg:{training_time_ms / max(step, 1):.2f}ms")
            run.sync()
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < args.iterations:
                run.log(f"stopping_early: wallclock_cap train_time:{training_time_ms:.0f}ms step:{step}/{args.iterations}")
            break
        elapsed_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        stats = train_step(run, trainer)
        optimizer_step(args, trainer, step, warmdown_multiplier(args, step, elapsed_ms))
        step += 1
        approx_ms = training_time_ms + 1000.0 * (time.perf_counter() - t0)
        # One small all-reduce per step: stop together at the cap, and fail fast on a non-finite loss.
        flags = torch.stack((torch.tensor(float(max_wallclock_ms is not None and approx_ms >= max_wallclock_ms),
                                          device=run.device), (~torch.isfinite(stats)).any().float()))
        reached_cap, non_finite = all_reduce(flags, dist.ReduceOp.MAX if run.distributed else None).tolist()
        if non_finite:
            raise RuntimeError(f"non-finite train loss at step {step}: loss, CE, mix = {stats.tolist()}")
        if stop_after_step is None and reached_cap:
            stop_after_step = step
        if args.train_log_every > 0 and (step <= 10 or step % args.train_log_every == 0 or
                                         stop_after_step is not None or step == args.iterations):
            _, ce, mix_nll = (all_reduce(stats) / run.world_size).tolist()
            run.log(f"step:{step}/{args.iterations} train_loss:{ce:.4f} train_time:{approx_ms:.0f}ms "
                    f"step_avg:{approx_ms / step:.2f}ms" + (f" mix_nll:{mix_nll:.4f}" if tables is not None else ""))
    run.log_peak_memory()
    return trainer.base_model


def export_artifact(run: Run, model: GPT) -> Path:
    """Rank 0 quantizes, compresses and writes the artifact; after the barrier every rank can reload it."""
    if run.master:
        run.artifact_path.write_bytes(compress_artifact(quantize_state_dict(model.state_dict(), run.args.quant_bits)))
    if run.distributed:
        dist.barrier()
    return run.artifact_path


def evaluate_artifact(run: Run, path: Path) -> None:
    """Score the artifact as submitted: its size against the cap, the reloaded model alone (sliding windows), then
    with the n-gram cache and TTT (score-then-update) under the legality audit; EVAL_DUMP writes the final pass."""
    args = run.args
    model_bytes = path.stat().st_size
    quant = load_artifact(path)["__format__"].removesuffix("_v1")
    run.log(f"Serialized model {quant}: {model_bytes} bytes")
    run.log(f"Code size: {run.code_bytes} bytes")
    run.log(f"Total submission size {quant}: {run.code_bytes + model_bytes} bytes")
    if not check_artifact_size(run.code_bytes + model_bytes):
        run.log(f"ARTIFACT_OVER_CAP total:{run.code_bytes + model_bytes} cap:{ARTIFACT_CAP_BYTES}")
        sys.exit(3)
    # A fresh model from the artifact's bytes alone: the score is that of what would be submitted.
    setup = build_eval_setup(run, model_from_artifact(args, path, run.device), args.eval_stride)
    n_weights = 1 + len(args.ngram_orders) if args.ngram_orders else 0
    final_pass = bool(args.ngram_orders or args.ttt)

    def new_record(is_final: bool) -> TargetRecord | None:
        return TargetRecord(len(run.val_tokens) - 1, n_weights, run.device) if args.eval_dump and is_final else None

    run.sync()
    result = eval_val(setup, new_record(not final_pass))
    run.log(f"final_{quant}_roundtrip val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} "
            f"eval_time:{result.time_ms['total']:.0f}ms")
    run.log(f"final_{quant}_roundtrip_exact val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}")
    if final_pass:
        roundtrip_ms = result.time_ms["total"]
        audit = None
        if args.ngram_orders:
            audit = LegalityAudit(sample_audit_positions(len(run.val_tokens), args.audit_positions, args.seed,
                                                         run.device), args.seed)
        # A fresh cache: the training-time tables are never consulted at evaluation.
        cache = new_ngram_tables(args, run.device) if args.ngram_orders else None
        ttt = TTTConfig(args.ttt_epochs if args.ttt else 0, args.ttt_lr, args.ttt_momentum, args.ttt_cosine,
                        args.ttt_grad_clip)
        result = eval_ngram_ttt(setup, chunk_bounds(len(run.val_tokens), args.eval_chunk_tokens), cache, ttt,
                                audit, new_record(True))
        if result.audit is not None:
            count, sum_err, gold_err, future_delta = result.audit
            run.log(f"legality_audit positions:{count} max_abs_sum_err:{sum_err:.3e} "
                    f"max_gold_logp_err:{gold_err:.3e} max_future_logp_delta:{future_delta:.3e}")
            if audit_fails(result.audit):
                run.log("LEGALITY_AUDIT_FAILED: a scored distribution does not sum to 1, does not match its score, "
                        "or depends on later tokens")
                sys.exit(4)
        times = dict(roundtrip=roundtrip_ms, **result.time_ms)
        times["total"] += roundtrip_ms
        run.log("eval_time " + " ".join(f"{k}:{v:.0f}ms" for k, v in times.items()))
        run.log(f"final_ngram_ttt val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} "
                f"neural_val_loss:{result.neural_val_loss:.4f}")
        run.log(f"final_ngram_ttt_exact val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}")
    run.log(f"scored_tokens:{result.scored_tokens} scored_bytes:{result.scored_bytes}")
    if result.record is not None and run.master:
        write_eval_dump(Path(args.eval_dump), result.record, result, run.val_tokens, run.luts, run.bos_id, run.run_id)
        run.log(f"eval_dump path:{args.eval_dump} targets:{len(run.val_tokens) - 1}")


def main() -> None:
    run = start_run(Hyperparameters())
    path = Path(run.args.eval_artifact) if run.args.eval_artifact else export_artifact(run, train_model(run))
    evaluate_artifact(run, path)
    run.log_peak_memory()
    if run.distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
