"""The INVALID n-gram scheme of PR #834, kept only as a contrast: tests and bench/sample_results.py show that the
legality audit of train_gpt.py rejects it. Never score with it. Not part of a run (train_gpt.py never imports it).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# the same key hashing as the exact tables, so the two differ only in how they count
from ngram_mixer import ExpertCounts, NgramTables, _as_ids, _columns, _context_keys, _mix64  # noqa: E402


class BucketedTables:
    """The INVALID scheme of PR #834, reproduced for contrast only: never score with it.

    Same interface as NgramTables (extend / lookup / distribution), so the real evaluation can run it and its
    legality audit can reject it. Per order, two separate tables of `buckets` counters, ctx[hash(context) mod B]
    and pair[hash(context, token) mod B], and the score of token v after a context is min(pair, ctx) / ctx.
    A pair bucket mixes unrelated (context, token) pairs and nothing ties it to its context bucket, so summed over
    the vocabulary these scores reach far above 1: they are not a distribution and their "BPB" measures nothing.
    """

    def __init__(self, vocab_size: int, orders=(2, 3, 4, 5, 6, 7), buckets: int = 1 << 20, device=None):
        if buckets < 1 or buckets & (buckets - 1):
            raise ValueError(f"buckets must be a power of two, got {buckets}")
        self.vocab_size, self.orders, self.max_order, self.mask = vocab_size, tuple(orders), max(orders), buckets - 1
        self.device = torch.device("cpu" if device is None else device)
        self.ctx_table = torch.zeros(len(self.orders), buckets, dtype=torch.int64, device=self.device)
        self.pair_table = torch.zeros_like(self.ctx_table)
        self.tail = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.num_tokens = 0

    def _bucket_counts(self, stream, positions, candidates):
        # ctx and pair bucket counts [K, P] (candidates [P]) or [K, P, C] (candidates [P, C]) at the positions
        contexts = _context_keys(_columns(stream, positions, self.max_order), self.vocab_size, self.orders)
        ctx, pair = [], []
        for k, key in enumerate(contexts):
            ctx.append(self.ctx_table[k][_mix64(key) & self.mask])
            pair_key = (key[:, None] if candidates.dim() == 2 else key) * self.vocab_size + candidates
            pair.append(self.pair_table[k][_mix64(pair_key) & self.mask])
        return torch.stack(ctx), torch.stack(pair)

    # the evaluation's state check reads only num_tokens and tail, which mean the same here
    check_holds_only_before = NgramTables.check_holds_only_before

    def extend(self, tokens: torch.Tensor) -> None:
        """Count every n-gram ending inside tokens ([N] int) into both bucket tables."""
        tokens = _as_ids(tokens, "tokens", self.vocab_size, self.device)
        stream = torch.cat([self.tail, tokens])
        positions = torch.arange(self.tail.numel(), stream.numel(), device=self.device)
        contexts = _context_keys(_columns(stream, positions, self.max_order), self.vocab_size, self.orders)
        for k, (n, key) in enumerate(zip(self.orders, contexts)):
            counted = positions >= n - 1
            key = key[counted]
            self.ctx_table[k] += torch.bincount(_mix64(key) & self.mask, minlength=self.mask + 1)
            pair_key = key * self.vocab_size + stream[positions[counted]]
            self.pair_table[k] += torch.bincount(_mix64(pair_key) & self.mask, minlength=self.mask + 1)
        self.tail = stream[-(self.max_order - 1):].clone()
        self.num_tokens += tokens.numel()

    def lookup(self, stream: torch.Tensor, positions: torch.Tensor, targets=None, exclude_self=False):
        """(ctx bucket count, min(pair, ctx) bucket count), int64 [K, P]: "pair / context" is PR #834's score.
        Arguments as NgramTables.lookup."""
        if exclude_self is not False:
            raise ValueError("BucketedTables only reproduces the evaluation cache; it has no leave-one-out")
        stream = _as_ids(stream, "stream", self.vocab_size, self.device)
        positions = _as_ids(positions, "positions", stream.numel() + (targets is not None), self.device)
        targets = stream[positions] if targets is None else _as_ids(targets, "targets", self.vocab_size, self.device)
        ctx, pair = self._bucket_counts(stream, positions, targets)
        seen = positions >= torch.tensor(self.orders, device=self.device)[:, None] - 1
        return ctx * seen, torch.minimum(pair, ctx) * seen

    def counts(self, stream: torch.Tensor, positions: torch.Tensor, targets=None, chunk_start=None, in_table=None):
        """PR #834's bucket counts in the form of NgramTables.counts, so train_gpt's expert_inputs can score with
        them: context = the context bucket, pair = min(pair bucket, context bucket), distinct = 0 (it keeps
        none). The smoothed expert is then max(pair - D, 0) / context, its ratio less the discount: still far
        above 1 summed over the vocabulary. No within-chunk counts (PR #834 had none)."""
        if in_table is not None:
            raise ValueError("BucketedTables only reproduces the evaluation cache; it has no training view")
        context, pair = self.lookup(stream, positions, targets)
        return ExpertCounts(context, pair, torch.zeros_like(context))

    def distribution(self, context: torch.Tensor) -> torch.Tensor:
        """The scores of every token after context, float64 [K, V]; rows sum far above 1 (that is the point)."""
        context = _as_ids(context, "context", self.vocab_size, self.device)
        stream = torch.cat([context, context.new_zeros(1)])
        position = torch.tensor([context.numel()], device=self.device)
        ctx, pair = self._bucket_counts(stream, position, torch.arange(self.vocab_size, device=self.device)[None])
        ctx, pair = ctx[:, 0, None].double(), pair[:, 0].double()
        seen = context.numel() >= torch.tensor(self.orders, device=self.device)[:, None] - 1
        return torch.where(seen & (ctx > 0), torch.minimum(pair, ctx) / ctx.clamp(min=1), 0.0)
