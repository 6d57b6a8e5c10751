"""analysis/layer_routing.py: Dynamic Layer Routing (DLR, github.com/N0AHZACH/Research) on a train_gpt.py artifact.

A light token-level router reads the residual stream after the first K always-kept layers and decides, per token
and per later layer, whether that layer runs for the token. It is trained with a binary Gumbel-softmax
straight-through estimator (STE), distillation (KD) from the frozen full-depth model, a per-layer sparsity penalty
and a target-skip-ratio term; the backbone stays frozen. At eval a skipped token does no work in that layer: the
layer runs on the gathered kept tokens only and its output is scattered back, so tokens/s is measured, not only
layer counts.

Attention inside a routed layer (the choice made here): the kept tokens of a sequence attend causally (original
order) to the kept tokens of the same sequence only, at their original RoPE positions. A skipped token neither
computes nor provides keys/values in that layer; its residual stream passes through unchanged. The gather path
pads each sequence's kept tokens to the batch's widest row (padding goes after the real tokens, so causal attention
never reads it). The masked path is the dense reference and the training path: every token runs through the block,
attention keys are restricted to kept tokens (a skipped query also sees itself, which gives the STE its
counterfactual "what if kept" output), and skipped tokens' outputs are replaced by their inputs.

The model's own layer loop runs unchanged (GPT.hidden: U-net skips, depth recurrence): a routed copy
of the model has each block from K on replaced by a wrapper that calls the original block, forwarding all
positional args. A block that runs more than once in one forward (depth recurrence, NUM_LOOPS) gets the same
decision on every pass: a per-loop decision is not built.

Baselines at equal average compute: the best static layer-drop mask (greedy search on held-out train tokens),
random per-token skipping at the DLR router's per-layer rates, and a stochastic-depth fine-tune (the backbone is
fine-tuned by KD under random per-token skipping at the target rate, then scored with random skipping at that rate).

Run (sample model, 2 CPU cores; the config fills the env vars not already set, as train_gpt.py reads them):
  OMP_NUM_THREADS=2 python analysis/layer_routing.py final_model.<RUN_ID>.ptz --out /tmp/dlr
Writes DIR/layer_routing.json, DIR/layer_routing.png and DIR/layer_routing.md (the tables).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "analysis")]
import devkit  # noqa: E402
from records.compare import bpb, document_ids, paired_bootstrap  # noqa: E402

BOS_ID = 1

# -----------------------------
# ROUTED MODEL
# -----------------------------


class RoutingState:
    """What the wrapped blocks of one forward share. `policy` maps the hidden state after the always-kept layers
    [B, T, D] to gates [B, T, R] (1 = the routed layer runs for the token, 0 = skipped; STE floats in training)."""

    def __init__(self):
        self.policy = None
        self.mode = "gather"
        self.gates: Tensor | None = None


class RouterTap(nn.Module):
    """The last always-kept block: runs it, then asks the policy for this forward's gates from its output."""

    def __init__(self, block: nn.Module, state: RoutingState):
        super().__init__()
        self.block, self.state = block, state

    def forward(self, x: Tensor, *rest) -> Tensor:
        out = self.block(x, *rest)
        if self.state.policy is not None and self.state.gates is None:
            self.state.gates = self.state.policy(out)
        return out


class PositionedRotary(nn.Module):
    """A block's rotary table read at given positions [B, W], so gathered kept tokens keep their original
    positions; with no positions set it is the original table."""

    def __init__(self, rotary: nn.Module):
        super().__init__()
        self.rotary, self.positions = rotary, None

    def forward(self, seq_len: int, *rest) -> tuple[Tensor, ...]:
        if self.positions is None:
            return self.rotary(seq_len, *rest)
        tables = self.rotary(int(self.positions.max()) + 1, *rest)
        # [1, 1, P, half] tables -> [B, 1, W, half]: one row of positions per sequence.
        return tuple(table[0, 0][self.positions].unsqueeze(1) for table in tables)


class KeptKeysAttention(TorchFunctionMode):
    """Inside a block, turns causal SDPA into causal SDPA over the kept keys only (plus each query itself)."""

    def __init__(self, key_kept: Tensor):  # [B, T] bool
        super().__init__()
        self.key_kept = key_kept

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            if not kwargs.pop("is_causal", False):
                raise RuntimeError("routed block calls scaled_dot_product_attention without is_causal=True; the "
                                   "masked path only knows how to restrict causal attention")
            seq_len = args[0].shape[-2]
            eye = torch.eye(seq_len, dtype=torch.bool, device=args[0].device)
            causal = torch.ones_like(eye).tril()
            kwargs["attn_mask"] = (causal & (self.key_kept[:, None, :] | eye))[:, None]  # [B, 1, T, T]
        return func(*args, **kwargs)


class RoutedBlock(nn.Module):
    """A routed layer: calls the original block on the kept tokens only ("gather") or densely with kept-only
    attention keys ("masked", the reference and training path). Positional args shaped [B, T, ...] like x (x0)
    are gathered with it; others pass through."""

    def __init__(self, block: nn.Module, index: int, state: RoutingState, rotary_type: type):
        super().__init__()
        self.block, self.index, self.state = block, index, state
        self.rotaries = []
        for name, module in list(block.named_modules()):
            if isinstance(module, rotary_type):
                parent, _, attr = name.rpartition(".")
                wrapped = PositionedRotary(module)
                setattr(block.get_submodule(parent) if parent else block, attr, wrapped)
                self.rotaries.append(wrapped)
        if not self.rotaries:
            raise RuntimeError(f"routed block {index} holds no {rotary_type.__name__}: gathered tokens would lose "
                               f"their positions")

    def forward(self, x: Tensor, *rest) -> Tensor:
        if self.state.gates is None:
            return self.block(x, *rest)
        gates = self.state.gates[..., self.index]
        if self.state.mode == "gather":
            return self.gathered(x, gates, rest)
        return self.masked(x, gates, rest)

    def gathered(self, x: Tensor, gates: Tensor, rest: tuple) -> Tensor:
        keep = gates > 0.5
        counts = keep.sum(1)
        width = int(counts.max())
        if width == 0:
            return x
        # Original positions of each row's kept tokens in order, then (as padding) its skipped ones: [B, W].
        order = torch.argsort(keep.logical_not().to(torch.int32), dim=1, stable=True)[:, :width]

        def take(t: Tensor) -> Tensor:
            index = order.view(*order.shape, *[1] * (t.dim() - 2)).expand(*order.shape, *t.shape[2:])
            return t.gather(1, index)

        args = [take(a) if isinstance(a, Tensor) and a.shape[:2] == x.shape[:2] else a for a in rest]
        for rotary in self.rotaries:
            rotary.positions = order
        try:
            y = self.block(take(x), *args)
        finally:
            for rotary in self.rotaries:
                rotary.positions = None
        rows, cols = (torch.arange(width, device=x.device) < counts[:, None]).nonzero(as_tuple=True)
        out = x.clone()
        out[rows, order[rows, cols]] = y[rows, cols]
        return out

    def masked(self, x: Tensor, gates: Tensor, rest: tuple) -> Tensor:
        keep = gates.detach() > 0.5
        with KeptKeysAttention(keep):
            y = self.block(x, *rest)
        # Value: y where kept, x where skipped (exactly). Gradient to the gates: (y - x), the STE of the seed.
        return torch.where(keep[..., None], y, x) + (gates - gates.detach())[..., None].to(x.dtype) * (y - x)


class RoutedGPT(nn.Module):
    """A routed copy of a loaded GPT: blocks [0, K) always run, blocks [K, L) are RoutedBlocks, and block K - 1
    feeds the policy. The model's own hidden() runs the layer loop."""

    def __init__(self, model: nn.Module, keep_first: int):
        super().__init__()
        # train_gpt is imported by the caller after its env is set.
        import train_gpt
        num_layers = len(model.blocks)
        if not 1 <= keep_first < num_layers:
            raise ValueError(f"--keep-first {keep_first}: need 1 <= K < {num_layers}, the model's layer count")
        self.model, self.state = copy.deepcopy(model), RoutingState()
        self.keep_first, self.num_layers, self.num_routed = keep_first, num_layers, num_layers - keep_first
        blocks = self.model.blocks
        blocks[keep_first - 1] = RouterTap(blocks[keep_first - 1], self.state)
        for index, layer in enumerate(range(keep_first, num_layers)):
            blocks[layer] = RoutedBlock(blocks[layer], index, self.state, train_gpt.Rotary)

    def hidden(self, input_ids: Tensor, policy=None, mode: str = "gather") -> tuple[Tensor, Tensor | None]:
        """([B, T, D] final hidden, [B, T, R] gates or None for full depth) of one routed forward."""
        if mode not in ("gather", "masked"):
            raise ValueError(f"routing mode {mode!r}: expected 'gather' or 'masked'")
        self.state.policy, self.state.mode, self.state.gates = policy, mode, None
        try:
            return self.model.hidden(input_ids), self.state.gates
        finally:
            self.state.policy, self.state.gates = None, None

    def logits(self, h: Tensor) -> Tensor:
        return self.model.logits(h)


# -----------------------------
# POLICIES
# -----------------------------


class TokenRouter(nn.Module):
    """Keep logits [B, T, R] for the routed layers from the hidden state after the always-kept layers."""

    def __init__(self, dim: int, num_routed: int, width: int = 64):
        super().__init__()
        self.fc, self.out = nn.Linear(dim, width), nn.Linear(width, num_routed)
        # Start near full depth (keep probability sigmoid(3) = 0.95) so KD starts from the teacher's own outputs.
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, 3.0)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(torch.relu(self.fc(F.rms_norm(h, (h.size(-1),)))))


class SampledRouterPolicy:
    """Training gates: binary Gumbel-softmax (logistic noise, temperature tau), hard 0/1 forward, soft gradient."""

    def __init__(self, router: TokenRouter, tau: float):
        self.router, self.tau, self.keep_prob = router, tau, None

    def __call__(self, h: Tensor) -> Tensor:
        logits = self.router(h)
        self.keep_prob = torch.sigmoid(logits)
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.tau)
        return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


class HardRouterPolicy:
    """Eval gates: keep iff router logit + shift > 0; the shift is calibrated to a target skip ratio."""

    def __init__(self, router: TokenRouter, shift: float = 0.0):
        self.router, self.shift, self.logits = router, shift, None

    def __call__(self, h: Tensor) -> Tensor:
        self.logits = self.router(h)
        return (self.logits + self.shift > 0).to(h.dtype)


def static_policy(mask: Tensor):  # [R] 0/1
    return lambda h: mask.to(h.dtype).expand(*h.shape[:2], -1)


def random_policy(keep_rates: Tensor, seed: int):  # [R] keep probability per routed layer
    """Independent per-token coin flips (a function of position and seed only, so causal)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda h: (torch.rand(*h.shape[:2], len(keep_rates), generator=generator) < keep_rates).to(h.dtype)


# -----------------------------
# TRAINING
# -----------------------------


def teacher_log_probs(teacher: nn.Module, batches: Tensor) -> Tensor:  # [S, B, T] -> [S, B, T, V] float16
    """The frozen full-depth model's log-probabilities, computed once and shared by every distillation run."""
    with torch.inference_mode():
        return torch.stack([teacher.logits(teacher.hidden(ids)).log_softmax(-1).half() for ids in batches])


def distill(routed: RoutedGPT, batches: Tensor, teacher_lp: Tensor, policy, params: list[Tensor], lr: float,
            penalty=None) -> list[float]:
    """Minimize KL(teacher || routed) (+ penalty()) over batches [S, B, T] with Adam on params, through the
    masked path. Returns the KD loss of every step."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for input_ids, target_lp in zip(batches, teacher_lp):
        h, _ = routed.hidden(input_ids, policy, mode="masked")
        student_lp = routed.logits(h).log_softmax(-1)
        kd = F.kl_div(student_lp.flatten(0, 1), target_lp.float().flatten(0, 1), log_target=True,
                      reduction="batchmean")
        loss = kd + (penalty() if penalty else 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(kd.item())
    return losses


def train_router(routed: RoutedGPT, batches: Tensor, teacher_lp: Tensor, target_skip: float, lr: float,
                 sparsity_weight: float, target_weight: float, tau: float, seed: int) -> tuple[TokenRouter, list]:
    """The DLR router for one target skip ratio (seed's v2 recipe: KD + per-layer L1 on keep probabilities +
    a quadratic pull of the mean skip ratio to its target)."""
    torch.manual_seed(seed)
    router = TokenRouter(routed.model.tok_emb.embedding_dim, routed.num_routed)
    policy = SampledRouterPolicy(router, tau)

    def penalty() -> Tensor:
        per_layer_keep = policy.keep_prob.mean(dim=(0, 1))  # [R]
        skip = 1.0 - per_layer_keep.mean()
        return sparsity_weight * per_layer_keep.mean() + target_weight * (skip - target_skip) ** 2

    losses = distill(routed, batches, teacher_lp, policy, list(router.parameters()), lr, penalty)
    return router, losses


def calibrate_shift(routed: RoutedGPT, router: TokenRouter, input_ids: Tensor, target_skip: float) -> float:
    """The logit shift that makes the hard router skip `target_skip` of (token, routed layer) pairs on these
    held-out train tokens."""
    policy = HardRouterPolicy(router)
    with torch.inference_mode():
        routed.hidden(input_ids, policy)
    return -float(torch.quantile(policy.logits.flatten().float(), target_skip))


# -----------------------------
# SCORING
# -----------------------------


def score_tokens(routed: RoutedGPT, policy, tokens: Tensor, seq_len: int, windows_per_batch: int,
                 train_gpt) -> tuple[np.ndarray, np.ndarray]:
    """(NLL [N - 1] float64, kept [N - 1, R] float32) for each target t = 1..N-1 of `tokens`, scored in
    non-overlapping windows (train_gpt.window_schedule with stride = seq_len). kept[t - 1, j] says whether routed
    layer j ran at the input position t - 1 that predicts t (all ones at full depth)."""
    n = len(tokens)
    start, lo, hi = train_gpt.window_schedule(1, n, seq_len, seq_len)
    nll = np.zeros(n - 1, dtype=np.float64)
    kept = np.ones((n - 1, routed.num_routed), dtype=np.float32)
    offsets = torch.arange(seq_len)
    with torch.inference_mode():
        for i in range(0, len(start), windows_per_batch):
            batch = slice(i, i + windows_per_batch)
            input_index = (start[batch, None] + offsets).clamp(max=n - 1)
            target_index = input_index + 1
            scored = (target_index >= lo[batch, None]) & (target_index < hi[batch, None])
            h, gates = routed.hidden(tokens[input_index], policy)
            positions = target_index[scored]
            lp = routed.logits(h[scored]).log_softmax(-1).gather(1, tokens[positions][:, None]).squeeze(1)
            nll[positions - 1] = -lp.double().numpy()
            if gates is not None:
                kept[positions - 1] = gates[scored].numpy()
    return nll, kept


def greedy_static_masks(routed: RoutedGPT, calib_ids: Tensor) -> list[Tensor]:
    """Greedy layer drop on held-out train tokens: mask d drops d routed layers, each step removing the layer
    whose removal raises the mean NLL least. Returns masks for d = 1..R."""

    def mean_nll(mask: Tensor) -> float:
        with torch.inference_mode():
            h, _ = routed.hidden(calib_ids[:, :-1], static_policy(mask))
            return float(F.cross_entropy(routed.logits(h).flatten(0, 1), calib_ids[:, 1:].flatten()))

    mask, masks = torch.ones(routed.num_routed), []
    for _ in range(routed.num_routed):
        trials = {}
        for layer in mask.nonzero().flatten().tolist():
            trial = mask.clone()
            trial[layer] = 0
            trials[layer] = mean_nll(trial)
        mask = mask.clone()
        mask[min(trials, key=trials.get)] = 0
        masks.append(mask)
    return masks


def tokens_per_second(configs: dict, input_ids: Tensor, reps: int) -> dict[str, float]:
    """Tokens/s of hidden + logits for each name -> (routed model, policy): the fastest of `reps` timed passes
    after one warm-up, configurations interleaved in every repetition. The fastest pass, as timeit advises: on
    a shared machine the slower ones measure other jobs."""
    times = {name: [] for name in configs}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for name, (routed, policy) in configs.items():
                begin = time.perf_counter()
                h, _ = routed.hidden(input_ids, policy)
                routed.logits(h)
                if rep:
                    times[name].append(time.perf_counter() - begin)
    return {name: input_ids.numel() / min(t) for name, t in times.items()}


# -----------------------------
# TOKEN CATEGORIES
# -----------------------------

STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these "
    "those he she they we you i his her their our your not no so do does did have has had will would can could "
    "there which who what when where how than then".split())


def token_categories(sp, train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean [V] masks: punctuation pieces, stop words, and rare tokens (the least frequent ids in the train
    stream that together make up 10% of its occurrences)."""
    vocab = len(train_counts)
    words = [sp.id_to_piece(i).lstrip("\u2581") for i in range(vocab)]
    punctuation = np.array([bool(w) and all(c in string.punctuation for c in w) for w in words])
    stop = np.array([w.lower() in STOP_WORDS for w in words])
    order = np.argsort(train_counts, kind="stable")
    rare = np.zeros(vocab, dtype=bool)
    rare[order[np.cumsum(train_counts[order]) <= 0.10 * train_counts.sum()]] = True
    return dict(punctuation=punctuation, stop_word=stop, rare=rare)


# -----------------------------
# MAIN
# -----------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for layer_routing.{json,png,md}")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "sample_cpu.env",
                        help="env file whose values fill the env vars not already set (model shape, DATA_PATH...)")
    parser.add_argument("--keep-first", type=int, default=1,
                        help="always-kept layers K (the seed uses 4; 1 suits a 4-layer model)")
    parser.add_argument("--targets", default="0.3333,0.5,0.6667",
                        help="target skip ratios of the routed (token, layer) pairs")
    parser.add_argument("--steps", type=int, default=50, help="router / stochastic-depth training steps")
    parser.add_argument("--batch-seqs", type=int, default=8, help="sequences (of TRAIN_SEQ_LEN) per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="router Adam learning rate")
    parser.add_argument("--sd-lr", type=float, default=3e-4, help="stochastic-depth fine-tune Adam learning rate")
    parser.add_argument("--calib-seqs", type=int, default=32, help="held-out train sequences for calibration")
    parser.add_argument("--val-tokens", type=int, default=65536, help="val prefix scored (0 = all)")
    parser.add_argument("--timing-reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    if not all(0.0 < t < 1.0 for t in args.targets):
        raise ValueError(f"--targets {args.targets}: each must be in (0, 1)")
    if not args.artifact.is_file():
        raise FileNotFoundError(f"artifact not found: {args.artifact}")
    return args


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main(argv=None) -> None:
    opts = parse_args(argv)
    for name, value in devkit.read_env_file(opts.config).items():
        os.environ.setdefault(name, value)
    import train_gpt
    began = time.perf_counter()
    torch.manual_seed(opts.seed)
    hp = train_gpt.Hyperparameters()
    cpu = torch.device("cpu")
    teacher = train_gpt.model_from_artifact(hp, opts.artifact, cpu).eval().requires_grad_(False)
    routed = RoutedGPT(teacher, opts.keep_first).eval().requires_grad_(False)
    seq_len, num_routed = hp.train_seq_len, routed.num_routed
    opts.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[{time.perf_counter() - began:7.1f}s] {msg}", flush=True)  # noqa: E731

    # Data as the trainer reads it: the train stream (calibration slice first, then router steps) and the val prefix.
    stream = train_gpt.TokenStream(train_gpt.list_shards(hp.data_path, "train"), hp.vocab_size)
    calib_ids = stream.take(opts.calib_seqs * (seq_len + 1)).long().view(opts.calib_seqs, seq_len + 1)
    batches = stream.take(opts.steps * opts.batch_seqs * seq_len).long().view(opts.steps, opts.batch_seqs, seq_len)
    train_counts = np.bincount(torch.cat([train_gpt.load_data_shard(f, hp.vocab_size) for f in
                                          train_gpt.list_shards(hp.data_path, "train")]).numpy(),
                               minlength=hp.vocab_size)
    val = train_gpt.load_validation_tokens(hp.data_path, hp.vocab_size, opts.val_tokens)
    sp = train_gpt.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    byte_tables = train_gpt.build_byte_tables(sp, hp.vocab_size, cpu)
    n_bytes = train_gpt.count_target_bytes(val[:-1], val[1:], byte_tables).numpy()
    docs = document_ids(val.numpy(), BOS_ID)
    val_np = val.numpy()
    windows_per_batch = max(1, 8192 // seq_len)
    log(f"val {len(val)} tokens ({docs.max() + 1} documents, {n_bytes.sum()} bytes); router training "
        f"{opts.steps} steps x {opts.batch_seqs} x {seq_len} tokens; keep_first={opts.keep_first} of "
        f"{routed.num_layers} layers")

    results, per_token, eval_policies = {}, {}, {}

    def evaluate(name: str, model: RoutedGPT, policy, **fields) -> None:
        nll, kept = score_tokens(model, policy, val, seq_len, windows_per_batch, train_gpt)
        executed = model.keep_first + kept.sum(1)
        per_token[name] = (nll, executed, kept.mean(0))
        skip = 1.0 - float(kept.mean())
        results[name] = dict(fields, val_bpb=bpb(nll, n_bytes), val_loss=float(nll.mean()), mean_executed_layers=float(
            executed.mean()), skip_ratio=skip)
        log(f"{name}: val_bpb {results[name]['val_bpb']:.4f} executed layers {executed.mean():.3f} skip {skip:.3f}")

    evaluate("full", routed, None, method="full depth", target_skip=0.0)
    eval_policies["full"] = (routed, None)
    for mask in greedy_static_masks(routed, calib_ids):
        name = f"static_drop{int(num_routed - mask.sum())}"
        dropped = [routed.keep_first + i for i in (mask == 0).nonzero().flatten().tolist()]
        evaluate(name, routed, static_policy(mask), method="static mask", target_skip=float(1 - mask.mean()),
                 dropped_layers=dropped)
        eval_policies[name] = (routed, static_policy(mask))

    teacher_lp = teacher_log_probs(teacher, batches)
    log("teacher log-probs cached")

    def evaluate_dlr(name: str, model: RoutedGPT, method: str, target: float) -> None:
        router, losses = train_router(model, batches, teacher_lp, target, opts.lr, sparsity_weight=0.01,
                                      target_weight=10.0, tau=1.0, seed=opts.seed)
        policy = HardRouterPolicy(router, calibrate_shift(model, router, calib_ids[:, :-1], target))
        evaluate(name, model, policy, method=method, target_skip=target, kd_first=losses[0],
                 kd_last=float(np.mean(losses[-10:])), shift=policy.shift)
        results[name]["layer_keep"] = per_token[name][2].tolist()
        eval_policies[name] = (model, policy)

    for target in opts.targets:
        tag = f"{target:.3f}"
        evaluate_dlr(f"dlr_{tag}", routed, "DLR", target)
        # Random skipping with the router's realized per-layer rates on val: equal compute in expectation.
        layer_keep = torch.from_numpy(per_token[f"dlr_{tag}"][2])
        evaluate(f"random_{tag}", routed, random_policy(layer_keep, opts.seed + 1), method="random per-token",
                 target_skip=target, layer_keep=layer_keep.tolist())
        eval_policies[f"random_{tag}"] = (routed, random_policy(layer_keep, opts.seed + 1))
        # Stochastic depth: a trainable copy, fine-tuned by KD under random skipping at the target rate.
        sd_model = RoutedGPT(teacher, opts.keep_first).requires_grad_(True)
        uniform_keep = torch.full((num_routed,), 1.0 - target)
        sd_losses = distill(sd_model, batches, teacher_lp, random_policy(uniform_keep, opts.seed + 2),
                            list(sd_model.parameters()), opts.sd_lr)
        sd_model.eval().requires_grad_(False)
        evaluate(f"sd_{tag}", sd_model, random_policy(uniform_keep, opts.seed + 3), method="stochastic-depth FT",
                 target_skip=target, kd_first=sd_losses[0], kd_last=float(np.mean(sd_losses[-10:])))
        eval_policies[f"sd_{tag}"] = (sd_model, random_policy(uniform_keep, opts.seed + 3))
        # The same router recipe on the stochastic-depth backbone: does routing still pay once the backbone has
        # learned to tolerate skipping?
        evaluate_dlr(f"sd_dlr_{tag}", sd_model, "DLR on SD backbone", target)

    # Measured speed of the gather/scatter path on one batch of val windows (hidden + logits).
    timing_ids = val[:16 * seq_len].view(16, seq_len)
    speeds = tokens_per_second(eval_policies, timing_ids, opts.timing_reps)
    for name, speed in speeds.items():
        results[name]["tokens_per_s"], results[name]["time_vs_full"] = speed, speeds["full"] / speed
    log("timing done")

    # Paired intervals over documents at equal compute: DLR against random and stochastic depth at its target,
    # and against the static mask whose skip ratio equals the target.
    comparisons = []
    for target in opts.targets:
        tag = f"{target:.3f}"
        pairs = [(f"dlr_{tag}", f"random_{tag}"), (f"dlr_{tag}", f"sd_{tag}"), (f"sd_dlr_{tag}", f"sd_{tag}")]
        pairs += [(f"dlr_{tag}", n) for n in results
                  if n.startswith("static") and abs(results[n]["target_skip"] - target) < 0.01]
        for dlr, rival in pairs:
            ci = paired_bootstrap(per_token[dlr][0] - per_token[rival][0], n_bytes, docs, resamples=2000,
                                  seed=opts.seed)
            comparisons.append(dict(dlr=dlr, rival=rival, delta_bpb=ci.delta_bpb, low=ci.low, high=ci.high,
                                    documents=ci.units, confidence=ci.confidence))
            log(f"{dlr} - {rival}: {ci.delta_bpb:+.4f} BPB [{ci.low:+.4f}, {ci.high:+.4f}]")

    # Token categories at the input position that each prediction is computed from.
    categories = token_categories(sp, train_counts)
    full_nll = per_token["full"][0]
    masks = {name: cat[val_np[:-1]] for name, cat in categories.items()}
    masks["high_loss"] = full_nll >= np.quantile(full_nll, 0.9)
    masks["all"] = np.ones(len(full_nll), dtype=bool)
    category_rows = []
    for cat, mask in masks.items():
        row = dict(category=cat, positions=int(mask.sum()), full_nll=float(full_nll[mask].mean()))
        for target in opts.targets:
            row[f"dlr_{target:.3f}_layers"] = float(per_token[f"dlr_{target:.3f}"][1][mask].mean())
        category_rows.append(row)

    wall = time.perf_counter() - began
    report = dict(artifact=str(opts.artifact), keep_first=opts.keep_first, num_layers=routed.num_layers,
                  val_tokens=len(val), val_targets=len(val) - 1, val_bytes=int(n_bytes.sum()),
                  documents=int(docs.max() + 1), seq_len=seq_len, steps=opts.steps,
                  train_tokens_per_step=opts.batch_seqs * seq_len, calib_tokens=opts.calib_seqs * seq_len,
                  threads=torch.get_num_threads(), wall_s=wall, results=results, comparisons=comparisons,
                  categories=category_rows)
    (opts.out / "layer_routing.json").write_text(json.dumps(report, indent=1))
    write_tables(report, opts.out / "layer_routing.md")
    plot(report, opts.out / "layer_routing.png")
    log(f"wrote {opts.out}; wall {wall:.0f}s")


def write_tables(report: dict, path: Path) -> None:
    rows = [[name, r["method"], f"{r['target_skip']:.3f}", f"{r['skip_ratio']:.3f}",
             f"{r['mean_executed_layers']:.3f}", f"{r['val_bpb']:.4f}", f"{r['tokens_per_s']:,.0f}",
             f"{r['time_vs_full']:.2f}"] for name, r in report["results"].items()]
    pareto = markdown_table(["config", "method", "target skip", "realized skip", "executed layers", "val_bpb",
                             "tokens/s", "time vs full"], rows)
    comparisons = markdown_table(
        ["DLR", "rival", "ΔBPB (DLR - rival)", "95% interval"],
        [[c["dlr"], c["rival"], f"{c['delta_bpb']:+.4f}", f"[{c['low']:+.4f}, {c['high']:+.4f}]"]
         for c in report["comparisons"]])
    layer_cols = [k for k in report["categories"][0] if k.endswith("_layers")]
    categories = markdown_table(
        ["category", "positions", "full-depth NLL"] + [k.removesuffix("_layers") + " layers" for k in layer_cols],
        [[c["category"], c["positions"], f"{c['full_nll']:.3f}"] + [f"{c[k]:.3f}" for k in layer_cols]
         for c in report["categories"]])
    path.write_text("\n\n".join([pareto, comparisons, categories]) + "\n")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"full depth": "k*", "static mask": "s", "DLR": "o", "random per-token": "^",
              "stochastic-depth FT": "v", "DLR on SD backbone": "D"}
    for method, style in styles.items():
        rows = sorted((r for r in report["results"].values() if r["method"] == method),
                      key=lambda r: r["mean_executed_layers"])
        # Lines join a method's points by compute; measured times are noisy, so the time panel shows points only.
        for ax, key, line in zip(axes, ("mean_executed_layers", "time_vs_full"), ("-", "")):
            ax.plot([r[key] for r in rows], [r["val_bpb"] for r in rows], style + line, label=method, ms=6)
    axes[0].set_xlabel("mean executed layers per token")
    axes[1].set_xlabel("measured time per token / full depth (CPU, gather path)")
    for ax in axes:
        ax.set_ylabel("sample val BPB")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Layer routing, {report['num_layers']}-layer sample model, K={report['keep_first']} always kept, "
                 f"{report['val_targets']:,} val targets", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
