"""Exact, normalized n-gram experts (orders 1..7 by default) for the neural / n-gram mixer.

Tests:      python -m pytest -q tests/test_ngram_mixer.py tests/test_experts.py tests/test_audit.py
Benchmark:  python bench/ngram_bench.py [--device cuda] [--tokens N];  python bench/experts_bench.py

Mixture. At position t, with the neural distribution q_t and gate logits g_t computed from the prefix only,
    p_t(v) = w0 * q_t(v) + sum_k w_k * p_k(v | ctx_k),
    w = softmax(g_t) over the neural slot and the valid experts (context seen often enough; others get 0),
    then w0 <- max(w0, neural_floor) and the experts' share is rescaled to 1 - w0.
Expert k is built from exact counts: c_k(ctx, v) / c_k(ctx), or the interpolated absolute-discounting
distribution of smoothed_probs() that backs off through the lower orders to the uniform. Either is a full
distribution over the vocabulary (below), so p_t sums to 1 whatever the gate says, and a floor > 0 keeps every
token's probability > 0. mixture_weights() is the one place the weights are made. The last expert may be the
DocumentCache: the current document's own n-grams (window_counts), smoothed on top of the highest table order.

Causality. A table holds only tokens already scored: the eval cache starts empty and extend(chunk) runs after
the chunk has been scored. counts() adds the chunk's own n-grams that end before t (every token before t counts,
as in a classical cache updated per token), never the one at t or later. Training the gate on frozen tables of
the training stream leaves a position's own occurrence out (lookup(..., exclude_self=...)), or, in counts(...,
in_table=...), every occurrence at or after it. A lookup at t reads the context stream[t-n+1:t]; stream[t] (or
the given target) only picks which of that context's counts is returned. LegalityAudit (at the end) re-scores
random targets through the production code with the target and every later token replaced by random ids: the
distribution over every candidate must sum to 1, give the logged score, and not move.

Normalization. Per order n the table is ONE sorted array of distinct pair keys ctx_key * V + v (the token v kept
exact) and a running count array cum, with count(pair_keys[i]) = cum[i+1] - cum[i]. The pairs of one context fill
the key range [ctx_key*V, ctx_key*V + V), so its context count is read as cum[hi] - cum[lo] over that range: it IS
the sum of its pair counts, and sum_v c(ctx, v) / c(ctx) = 1 by construction. There is no separate context table
that could disagree (PR #834 kept one; its scores sum to hundreds over the vocabulary, see bench/pr834_tables.py).

Keys. b = ceil(log2 V). If n*b <= 63 the context key packs the n-1 ids exactly (base V, oldest id most
significant), so a pair key is the base-V number of the n-gram. Otherwise the ids are packed into words of
floor(63/b) ids, the words are chained through the splitmix64 finalizer (int64 wraparound arithmetic), and the
result is reduced to 63-b bits so pair keys stay non-negative int64. V=1024 packs orders 2-6 and hashes 7
(53-bit keys); V=8192 packs 2-4 (4*13 = 52 <= 63, 5*13 = 65 > 63) and hashes 5-7 (50-bit keys). A collision merges
two contexts' statistics into one distribution, which is still normalized. With D distinct contexts the expected
number of colliding pairs is D^2 / 2^(bits+1): 0.21 at D = 62M for 53 bits, 1.7 for 50 bits.

Layout and memory. keys: int64 [sum_n U_n], the orders' sorted pair keys concatenated; cum: int64
[sum_n (U_n + 1)], each order's running counts starting at 0. pair_keys[n] and cum_counts[n] are views into them,
so one Triton launch serves all orders. 16 bytes per distinct n-gram (+ 8 per order); of the token stream only
the last max_order-1 tokens (the next extend's contexts) and the token count are kept. extend() sorts the chunk's
pair keys (CUB radix sort on CUDA, numpy's sort on CPU, counting for order 2 of long chunks), adds the counts of
keys already present with index_add_, and merges the new keys in one pass (searchsorted + index_copy_), so many
small extends cost O(table) each and give byte-identical arrays to one extend of the concatenation. A lookup is
three binary searches per (order, position): lower bound of ctx_key*V, upper bound of ctx_key*V + V-1, and lower
bound of the pair key.
"""
import contextlib
import itertools
import math
import secrets
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path serves CPU and installs without triton
    triton = None

# splitmix64 constants as signed int64: torch has no uint64 arithmetic, and int64 products wrap like uint64 ones
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)

# Positions per program and warps of _ngram_lookup_kernel, tuned on an H100 (torch 2.11, triton 3.6) for 1M
# positions x 6 orders on a 61M-n-gram table: 0.76 ms, vs 0.83 at 128/4 and 1.22 at 256/4.
LOOKUP_BLOCK = 64
LOOKUP_WARPS = 1


def _shr(x, s):
    # logical right shift: torch's >> on int64 is arithmetic, so mask off the copied sign bits
    return (x >> s).bitwise_and_((1 << (64 - s)) - 1)


def _mix64(x):
    # splitmix64 finalizer (a bijection of 64-bit words); in place after the first op, which leaves x untouched
    x = x ^ _shr(x, 30)
    x *= _MIX1
    x ^= _shr(x, 27)
    x *= _MIX2
    x ^= _shr(x, 31)
    return x


def _bits(vocab_size):
    return (vocab_size - 1).bit_length()


def _context_keys(columns, vocab_size, orders):
    """Yield, for each n in `orders`, the context keys [P] int64 in [0, 2^(63-b)) of P positions.

    columns: iterable of [P] int64; the j-th (j = 1, 2, ...) holds the ids j steps before each position. Orders
    with n*b <= 63 pack their n-1 ids exactly (newest least significant). Longer contexts are cut into words of
    floor(63/b) packed ids, chained through splitmix64 (h <- mix(h + word + gamma), a bijection for fixed h),
    the partial last word included, and masked to 63-b bits.
    """
    bits = _bits(vocab_size)
    per_word = 63 // bits
    chain, word, in_word = 0, 0, 0
    columns = iter(columns)
    if orders[0] == 1:
        # the unigram's context is empty: key 0 for every position
        first = next(columns)
        yield torch.zeros_like(first)
        columns = itertools.chain([first], columns)
    for j, ids in zip(range(1, orders[-1]), columns):
        word = ids if in_word == 0 else torch.add(word, ids, alpha=vocab_size**in_word)
        in_word += 1
        mixed = None
        if j + 1 in orders:
            if j < per_word:
                yield word
            else:
                mixed = _mix64(word + (chain + _GAMMA))
                yield mixed & ((1 << (63 - bits)) - 1)
        if in_word == per_word and j + 1 < orders[-1]:
            chain = _mix64(word + (chain + _GAMMA)) if mixed is None else mixed
            word, in_word = 0, 0


def _columns(stream, positions, max_order):
    # ids 1 .. max_order-1 steps before each position, clamped at the stream start (callers mask t < n-1)
    return (stream[(positions - j).clamp_(min=0)] for j in range(1, max_order))


def _unique_counts(x, key_range):
    """Sorted distinct values [U] int64 and their counts [U] int64 of x: [N] int64 in [0, key_range).

    x is the caller's temporary: on CPU it is sorted in place."""
    if x.numel() == 0:
        return x, x
    if key_range <= 4 * x.numel():
        # small key space (order 2 of a long chunk): counting, O(N + key_range), beats sorting
        counts = torch.bincount(x, minlength=key_range)
        values = counts.nonzero()[:, 0]
        return values, counts[values]
    if x.device.type == "cpu":
        # numpy's vectorized sort is ~2x faster than torch.sort on CPU, and torch.unique ~5x slower than both
        # (torch 2.13, numpy 2.4)
        array = x.numpy()
        array.sort()
        starts = np.flatnonzero(np.concatenate(([True], array[1:] != array[:-1])))
        return torch.from_numpy(array[starts]), torch.from_numpy(np.diff(starts, append=array.size))
    return torch.unique(x, sorted=True, return_counts=True)


def _searchsorted(keys, values, right=False):
    """torch.searchsorted of values (any shape) in sorted 1-D keys, all int64."""
    if keys.device.type == "cpu":
        # numpy's binary search is 1.6x-4.6x faster than torch's on CPU (2-core box; H100 host)
        side = "right" if right else "left"
        return torch.from_numpy(np.searchsorted(keys.numpy(), values.numpy(), side=side))
    return torch.searchsorted(keys, values, right=right)


def _merge_counts(keys, counts, new_keys, new_counts):
    """Merge sorted distinct new_keys [N] (counts [N]) into sorted distinct keys [M] (counts [M]); all int64.

    Returns the merged sorted distinct keys [M + I] and counts [M + I], I = number of keys not yet present.
    `counts` is updated in place.
    """
    m = keys.numel()
    if m == 0:
        return new_keys, new_counts
    at = _searchsorted(keys, new_keys)
    found = keys[at.clamp(max=m - 1)] == new_keys
    counts = counts.index_add_(0, at[found], new_counts[found])
    fresh = ~found
    ins_at, ins_keys, ins_counts = at[fresh], new_keys[fresh], new_counts[fresh]
    # old entry j moves up by the number of inserts that sort before it; insert i by the i inserts before it
    old_dest = torch.arange(m, device=keys.device) + torch.bincount(ins_at, minlength=m + 1)[:m].cumsum(0)
    new_dest = ins_at + torch.arange(ins_at.numel(), device=keys.device)
    total = m + ins_at.numel()
    out_keys = keys.new_empty(total).index_copy_(0, old_dest, keys).index_copy_(0, new_dest, ins_keys)
    out_counts = counts.new_empty(total).index_copy_(0, old_dest, counts).index_copy_(0, new_dest, ins_counts)
    return out_keys, out_counts


def _as_ids(x, name, limit, device):
    """Check x is a 1-D integer tensor with values in [0, limit); return it as int64 on `device`."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {x.dtype}")
    x = x.to(device=device, dtype=torch.int64)
    if x.numel():
        # one device sync for both bounds; the offending index is only searched for on error
        lo, hi = torch.stack(torch.aminmax(x)).tolist()
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            index = int((x == bad).nonzero()[0, 0])
            raise ValueError(f"{name}[{index}] = {bad} is outside [0, {limit})")
    return x


def _sorted(x):
    """x ([N] int64, the caller's temporary) sorted ascending; on CPU in place."""
    if x.device.type == "cpu":
        # numpy's sort is ~2x faster than torch.sort on CPU (see _unique_counts)
        x.numpy().sort()
        return x
    return torch.sort(x).values


def _drops_masked(device):
    """Whether masked-out entries are dropped (True) or kept as neutral entries that count for nothing. On CPU,
    dropping them makes the sorts smaller. On CUDA it would cost a device sync (boolean-mask indexing calls
    nonzero), and the GPU lookup is bound by its syncs and launches, not by its work. Both give the same counts
    (tests/test_experts.py runs the counting tests both ways)."""
    return device.type == "cpu"


def _row_dense_ids(pair_keys, vocab_size):
    """Dense ids of n-grams given as pair keys [K, N] int64 (context key * V + token, row k one order): pair ids
    [K, N], equal iff the same row holds the same key, and context ids [K, N], equal iff the same row holds the
    same context; both in [0, K * N), rows share no id. One sort serves both: pair keys sort by context first.
    The ids are bounded by K * N rather than by their count, which would cost a device sync to read."""
    sorted_keys, order = torch.sort(pair_keys, dim=1)
    ids = []
    for keys in (sorted_keys, sorted_keys.div(vocab_size, rounding_mode="floor")):
        new = torch.ones_like(keys, dtype=torch.bool)
        new[:, 1:] = keys[:, 1:] != keys[:, :-1]
        ids.append(torch.empty_like(keys).scatter_(1, order, new.reshape(-1).cumsum(0).view(keys.shape) - 1))
    return ids[0], ids[1]


class _EarlierEqual:
    """Counts of equal ids in a position range: #{events e : id_e == q and lo <= position_e < hi} per query q.

    The events are sorted once by comp = id * S + position (S > every position and bound), so the events of one
    id lie in [id * S, id * S + S) in position order, and a count is two binary searches. Events where `keep` is
    false count for nothing: dropped where _drops_masked, else moved to position `bound_limit`, which no range
    reaches (hi <= bound_limit).
    """

    def __init__(self, ids, positions, bound_limit, id_limit, keep=None):
        # ids: [..] int64 in [0, id_limit); positions: [..] int64 in [0, bound_limit); keep: None or bool [..];
        # bound_limit: int >= every query bound
        self.scale = bound_limit + 1
        if id_limit * self.scale >= 1 << 62:
            raise ValueError(f"{id_limit} ids x {self.scale} positions overflow the int64 sort key")
        if keep is not None:
            if _drops_masked(ids.device):
                ids, positions = ids[keep], positions[keep]
            else:
                positions = torch.where(keep, positions, bound_limit)
        self.comp = _sorted((ids * self.scale + positions).reshape(-1))

    def count_between(self, query, lo, hi):
        """#{events with id == query and lo <= position < hi}: query [..] int64 ids, lo None (from 0) or [..]
        int64, hi [..] int64, bounds in [0, bound_limit]. Returns int64 [..]."""
        base = query * self.scale
        below_lo = _searchsorted(self.comp, base if lo is None else base + lo)
        return _searchsorted(self.comp, base + hi) - below_lo


@dataclass
class ExpertCounts:
    """Counts behind each expert at each query, rows k = the table's orders, all int64 [K, P].

    context: c(ctx), how often the order-n context before the target was seen; pair: c(ctx, target);
    distinct: N1+(ctx .), how many distinct tokens were seen after that context. Zero where t < n-1.
    context = sum over tokens of pair, and distinct = #{tokens with pair > 0}, exactly.
    """
    context: torch.Tensor
    pair: torch.Tensor
    distinct: torch.Tensor


class NgramTables:
    """Exact count tables for the given n-gram orders over a token stream that grows by extend()."""

    def __init__(self, vocab_size: int, orders=(2, 3, 4, 5, 6, 7), device=None, backend: str = "auto"):
        """vocab_size: V, ids are in [0, V). orders: sorted distinct ints >= 1 (1 = unigram, empty context), the
        largest >= 2. device: where the tables live
        (default CPU). backend: lookup engine, "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch"
        (torch.searchsorted), or "auto" = triton on CUDA when importable, else torch."""
        orders = tuple(orders)
        if not isinstance(vocab_size, int) or not 2 <= vocab_size <= 2**31:
            raise ValueError(f"vocab_size must be an int in [2, 2^31], got {vocab_size!r}")
        if (not orders or any(type(n) is not int or n < 1 for n in orders) or list(orders) != sorted(set(orders))
                or orders[-1] < 2):
            raise ValueError(f"orders must be sorted distinct ints >= 1, the largest >= 2, got {orders!r}")
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if backend == "triton" and triton is None:
            raise RuntimeError("backend='triton' needs triton installed")
        self.vocab_size, self.orders, self.max_order = vocab_size, orders, orders[-1]
        self.device = torch.device("cpu" if device is None else device)
        if backend == "auto":
            backend = "triton" if triton is not None and self.device.type == "cuda" else "torch"
        self.backend = backend
        # orders whose context keys are hashed; the others pack the context exactly
        self.hashed_orders = tuple(n for n in orders if n * _bits(vocab_size) > 63)
        self._key_range = {n: 2**63 if n in self.hashed_orders else vocab_size**n for n in orders}
        # tokens extended so far, and the last max_order-1 of them (the next extend's contexts; the evaluation
        # checks them against the val stream before scoring)
        self.num_tokens = 0
        self.tail = torch.zeros(0, dtype=torch.int64, device=self.device)
        empty = [self.tail] * len(orders)
        self._store(empty, empty)

    def _store(self, keys, counts):
        # keys / counts: per order, sorted distinct pair keys [U_n] and their counts [U_n], int64.
        # Flat arrays let one Triton launch serve all orders; the per-order views cost nothing.
        self.keys = torch.cat(keys)
        starts = np.concatenate([[0], np.cumsum([k.numel() for k in keys])]).tolist()
        self.cum = torch.empty(starts[-1] + len(keys), dtype=torch.int64, device=self.device)
        for k, c in enumerate(counts):
            self.cum[starts[k] + k] = 0
            torch.cumsum(c, 0, out=self.cum[starts[k] + k + 1:starts[k + 1] + k + 1])
        self.key_offsets = torch.tensor(starts, dtype=torch.int64, device=self.device)
        self.pair_keys = {n: self.keys[starts[k]:starts[k + 1]] for k, n in enumerate(self.orders)}
        self.cum_counts = {n: self.cum[starts[k] + k:starts[k + 1] + k + 1] for k, n in enumerate(self.orders)}

    def extend(self, tokens: torch.Tensor, piece_tokens: int = 1 << 26) -> None:
        """Count every n-gram that ends inside tokens ([N] int, ids in [0, V)); contexts reach back into
        earlier extends. Chunked extends give the same arrays as one extend of the concatenation, so long inputs
        go in pieces of piece_tokens, which bound the sort's temporary memory."""
        tokens = _as_ids(tokens, "tokens", self.vocab_size, self.device)
        for begin in range(0, tokens.numel(), piece_tokens):
            self._extend_piece(tokens[begin:begin + piece_tokens])

    def _extend_piece(self, tokens: torch.Tensor) -> None:
        # left-pad the kept tail to max_order-1 ids so that every context column is a slice (no gather)
        pad = self.max_order - 1 - self.tail.numel()
        stream = torch.cat([self.tail.new_zeros(pad), self.tail, tokens])
        start, end = self.max_order - 1, stream.numel()
        columns = (stream[start - j:end - j] for j in range(1, self.max_order))
        keys, counts = [], []
        for n, ctx in zip(self.orders, _context_keys(columns, self.vocab_size, self.orders)):
            # only n-grams that start at or after the first token ever seen (not in the padding)
            first = max(0, n - 1 - self.tail.numel())
            pair_keys = torch.add(tokens[first:], ctx[first:], alpha=self.vocab_size)
            new_keys, new_counts = _unique_counts(pair_keys, self._key_range[n])
            # counts live only as running sums; the merge works on plain counts and _store re-sums them
            old_counts = self.cum_counts[n].diff()
            merged = _merge_counts(self.pair_keys[n], old_counts, new_keys, new_counts)
            keys.append(merged[0])
            counts.append(merged[1])
        self._store(keys, counts)
        # the kept tail holds real tokens only: padding kept here would be counted as context by the next extend
        self.tail = stream[pad:][-(self.max_order - 1):].clone()
        self.num_tokens += tokens.numel()

    def lookup(self, stream: torch.Tensor, positions: torch.Tensor, targets=None, exclude_self=False):
        """Counts of every order at every position.

        stream: [L] int, ids in [0, V); positions: [P] int in [0, L). For order n (row k) and t = positions[p]:
        context = stream[t-n+1:t], token = stream[t]; t < n-1 gives (0, 0). targets: optional [P] int, ids in
        [0, V), the tokens to count instead of stream[positions]; then positions may equal L, so a stream that
        ends right before t can be asked about every candidate token at t (the legality audit). exclude_self:
        bool, or bool tensor broadcastable to [K, P]; where true (and t >= n-1) the occurrence at t itself is
        subtracted from both counts (leave-one-out, for streams extended into the table); ValueError if it is
        not in the table.
        Returns (context_count, pair_count), int64 [K, P], context_count = sum over tokens of pair_count.
        """
        stream = _as_ids(stream, "stream", self.vocab_size, self.device)
        positions = _as_ids(positions, "positions", stream.numel() + (targets is not None), self.device)
        ctx, pair, _, valid = self._table_counts(stream, positions, self._targets(stream, positions, targets))
        if exclude_self is False:
            return ctx, pair
        drop = torch.as_tensor(exclude_self, dtype=torch.bool, device=self.device)
        try:
            drop = drop.expand(len(self.orders), positions.numel())
        except RuntimeError:
            raise ValueError(f"exclude_self of shape {tuple(drop.shape)} does not broadcast to "
                             f"[{len(self.orders)}, {positions.numel()}]") from None
        drop = (drop & valid).long()
        ctx, pair = ctx - drop, pair - drop
        missing = (pair < 0).nonzero()
        if missing.numel():
            k, p = missing[0].tolist()
            raise ValueError(f"exclude_self at order {self.orders[k]}, position {int(positions[p])}: "
                             "that n-gram is not in the table")
        return ctx, pair

    def counts(self, stream: torch.Tensor, positions: torch.Tensor, targets=None, chunk_start=None,
               in_table=None) -> ExpertCounts:
        """Counts of every order at every position, as seen from the prefix before it. Two uses:

        Evaluation (in_table None): the table PLUS the stream's own earlier tokens. For t = positions[p] the
        counts are those of the table plus those of the n-grams ending at q with chunk_start <= q < t in
        `stream`: every token before t when the table holds stream[0:chunk_start] (the eval cache), so a chunk's
        targets see its own earlier tokens exactly, never the token at t or later ones. chunk_start: int
        (default self.num_tokens); where chunk_start >= t the table alone is read.
        Training (in_table given): the stream lies inside the table's own stream. in_table: bool [K, L], where
        the order-k n-gram ending at stream position q was counted into the table. The counts are the table's
        WITHOUT those occurrences at q >= t (leave-future-out: the position sees the rest of the table and its
        own stream's earlier tokens, as the eval cache does; q = t alone is leave-one-out). chunk_start unused.

        stream: [L] int, ids in [0, V); positions: [P] int in [0, L), or [0, L] when targets is given;
        targets: [P] int (default stream[positions]): the token whose pair count is read at each position.
        Returns ExpertCounts ([K, P] int64 each), exact.
        """
        stream = _as_ids(stream, "stream", self.vocab_size, self.device)
        positions = _as_ids(positions, "positions", stream.numel() + (targets is not None), self.device)
        targets = self._targets(stream, positions, targets)
        # the host reads device values (the bounds) before this call queues its kernels, so it never waits for them
        if in_table is None:
            # events up to the last bound any query needs: the last target, where only earlier n-grams join
            first = self.num_tokens if chunk_start is None else int(chunk_start)
            end = min(stream.numel(), int(positions.max()) if positions.numel() else 0)
            if first < 0:
                raise ValueError(f"chunk_start must be >= 0, got {first}")
        else:
            if in_table.shape != (len(self.orders), stream.numel()) or in_table.dtype != torch.bool:
                raise ValueError(f"in_table must be bool [{len(self.orders)}, {stream.numel()}], "
                                 f"got {in_table.dtype} {tuple(in_table.shape)}")
            first, end = 0, stream.numel()  # the table's own n-grams leave up to the stream's end
        base = self._context_bases(stream, positions)
        context, pair, distinct, valid = self._table_counts(stream, positions, targets, base)
        if end <= first:
            return ExpertCounts(context, pair, distinct)
        event_pos = torch.arange(first, end, device=self.device)
        event_base = self._context_bases(stream, event_pos)
        event_tokens = stream[event_pos]
        _, event_table_pair, _, live = self._table_counts(stream, event_pos, event_tokens, event_base)
        # All orders at once, a few large ops instead of a loop per order (on GPU the ops' launches, not their
        # work, bound this): flat over (order, event) and (order, query), with ids that are equal iff two n-grams
        # have the same order and context (ctx_id) or the same order, context and token (pair_id). Events that
        # are not live (t < n-1) are masked by `keep`, not dropped, so that no step syncs the device.
        n_events, shape = event_pos.numel(), context.shape
        pair_id, ctx_id = _row_dense_ids(torch.cat([event_base + event_tokens, base + targets], dim=1),
                                         self.vocab_size)
        n_ids = pair_id.numel()
        query_ctx, query_pair = ctx_id[:, n_events:].reshape(-1), pair_id[:, n_events:].reshape(-1)
        ctx_id, pair_id = ctx_id[:, :n_events].reshape(-1), pair_id[:, :n_events].reshape(-1)
        pos = event_pos.expand_as(live).reshape(-1)
        held = torch.zeros_like(live) if in_table is None else in_table.to(self.device)[:, first:end]
        added, own = (live & ~held).reshape(-1), (live & held).reshape(-1)
        bound = torch.where(valid, positions, 0).clamp(max=end).reshape(-1)
        later = torch.where(valid, end, 0).reshape(-1)
        context, pair, distinct = context.reshape(-1), pair.reshape(-1), distinct.reshape(-1)
        # events outside the table join where q < t; the table's own leave where q >= t (in training only)
        leaving = in_table is not None
        for sign, keep, lo, hi in ((1, added, None, bound), (-1, own, bound, later))[:1 + leaving]:
            context += sign * _EarlierEqual(ctx_id, pos, end, n_ids, keep).count_between(query_ctx, lo, hi)
            pair += sign * _EarlierEqual(pair_id, pos, end, n_ids, keep).count_between(query_pair, lo, hi)
        # distinct continuations, per pair v of this stream, with T(v) its table count and first_added(v) /
        # first_own(v) the first position of each kind: v is seen at t iff T(v) > #own at >= t, or it was
        # added before t. It joins at first_added(v) + 1 when T(v) = 0; it leaves at first_own(v) + 1 when
        # all its table occurrences are own ones (counting back from the end), unless already added then.
        # Per-pair arrays are indexed by pair id; ids no live event has stay at their neutral values.
        never = torch.full((n_ids,), end, dtype=torch.int64, device=self.device)
        first_added = never.clone().scatter_reduce_(0, pair_id, torch.where(added, pos, end), "amin")
        first_own = never.clone().scatter_reduce_(0, pair_id, torch.where(own, pos, end), "amin")
        own_count = torch.zeros_like(never).index_add_(0, pair_id, own.long())
        # every live event of a pair holds the same table count; amax ignores the 0 of events that are not live
        table_count = torch.zeros_like(never).scatter_reduce_(0, pair_id, event_table_pair.reshape(-1), "amax")
        if leaving:  # the caller's in_table must mark only n-grams that the table holds
            overdrawn = (own_count > table_count)[pair_id].view(live.shape)  # per event: its row names the order
            if overdrawn.any():
                k = int(overdrawn.any(dim=1).nonzero()[0, 0])
                raise ValueError(f"in_table marks order-{self.orders[k]} n-grams that are not in the table")
        group_ctx = torch.zeros_like(never).scatter_(0, pair_id, ctx_id)
        fresh = (table_count == 0) & (first_added < end)
        vanishing = (own_count > 0) & (own_count == table_count)
        rejoin = vanishing & (first_added < first_own)
        terms = ((1, fresh, first_added, None, bound), (-1, vanishing, first_own, bound, later),
                 (1, rejoin, first_added, None, bound), (-1, rejoin, first_own, None, bound))
        for sign, keep, at, lo, hi in terms if leaving else terms[:1]:
            distinct += sign * _EarlierEqual(group_ctx, at, end, n_ids, keep).count_between(query_ctx, lo, hi)
        return ExpertCounts(context.view(shape), pair.view(shape), distinct.view(shape))

    def _targets(self, stream, positions, targets):
        # the token counted at each position: stream[positions], or the checked explicit targets [P]
        if targets is None:
            return stream[positions]
        targets = _as_ids(targets, "targets", self.vocab_size, self.device)
        if targets.shape != positions.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}, positions {tuple(positions.shape)}")
        return targets

    def _context_bases(self, stream, positions):
        # context key * V, int64 [K, P], of the context right before each position (positions may equal L)
        return torch.stack(list(_context_keys(_columns(stream, positions, self.max_order), self.vocab_size,
                                              self.orders))).mul_(self.vocab_size)

    def _table_counts(self, stream, positions, tokens, base=None):
        """(context, pair, distinct, valid) [K, P] of the table alone: the counts of the context before each
        position (stream [L] int64, positions [P] int64 in [0, L]) and of the pair (context, tokens[p]), the
        number of distinct tokens seen after the context, and valid = t >= n-1 (counts are 0 elsewhere)."""
        valid = positions >= torch.tensor(self.orders, device=self.device)[:, None] - 1
        # keys are computed here for both backends, so the hashing exists in one place
        base = self._context_bases(stream, positions) if base is None else base
        if self.backend == "triton" and positions.numel() and self.keys.numel():
            counts = _lookup_triton(self.keys, self.cum, self.key_offsets, base, tokens, self.vocab_size)
        else:
            counts = self._lookup_torch(base, tokens)
        for c in counts:
            c.masked_fill_(~valid, 0)
        return (*counts, valid)

    def _lookup_torch(self, base, tokens):
        # base: [K, P] int64 context key * V; tokens: [P] int64. Returns (ctx, pair, distinct) int64 [K, P].
        ctx, pair, distinct = torch.zeros_like(base), torch.zeros_like(base), torch.zeros_like(base)
        for k, n in enumerate(self.orders):
            keys, cum = self.pair_keys[n], self.cum_counts[n]
            if keys.numel() == 0:
                continue
            # sorted queries keep successive binary searches on cached paths: 3x faster on the 2-core CPU box,
            # though ~1.3x slower on a 300 MB-L3 host where random searches stay in cache. Sorting by pair
            # key sorts the context bases too.
            query, perm = torch.sort(base[k] + tokens)
            first = query - tokens[perm]
            # upper bound of the context's last pair key: first + V itself can overflow int64 for hashed keys
            lo = _searchsorted(keys, first)
            hi = _searchsorted(keys, first + (self.vocab_size - 1), right=True)
            at = _searchsorted(keys, query)
            hit = keys[at.clamp(max=keys.numel() - 1)] == query
            ctx[k, perm] = cum[hi] - cum[lo]
            pair[k, perm] = cum[at + hit.long()] - cum[at]
            # the context's distinct pair keys are exactly keys[lo:hi]
            distinct[k, perm] = hi - lo
        return ctx, pair, distinct

    def distribution(self, context: torch.Tensor) -> torch.Tensor:
        """Next-token distributions after context ([L] int, ids in [0, V)), float64 [K, V]. Row k uses the last
        n-1 ids for order n; it is all zeros if L < n-1 or that context was never seen, else it sums to 1."""
        context = _as_ids(context, "context", self.vocab_size, self.device)
        out = torch.zeros(len(self.orders), self.vocab_size, dtype=torch.float64, device=self.device)
        if context.numel() == 0:
            return out
        columns = _columns(context, torch.tensor([context.numel()], device=self.device), self.max_order)
        for k, (n, ctx) in enumerate(zip(self.orders, _context_keys(columns, self.vocab_size, self.orders))):
            keys, cum = self.pair_keys[n], self.cum_counts[n]
            if context.numel() < n - 1 or keys.numel() == 0:
                continue
            # the context's pairs are exactly the keys in [base, base + V), in token order
            base = ctx * self.vocab_size
            lo = int(_searchsorted(keys, base))
            hi = int(_searchsorted(keys, base + (self.vocab_size - 1), right=True))
            counts = (cum[lo + 1:hi + 1] - cum[lo:hi]).double()
            out[k, keys[lo:hi] - base] = counts / counts.sum()
        return out

    def check_holds_only_before(self, stream: torch.Tensor, first: int) -> None:
        """CausalityViolation unless the tables hold a prefix of `stream` ([N] int64) that ends at or before `first`: the
        evaluation calls this before scoring targets from `first`, as a table may only hold scored tokens. The
        count and the kept tail are checked, so a chunk added shifted (PR #834's boundary bug) is caught too."""
        held = self.num_tokens
        if held > first or not torch.equal(self.tail, stream[max(0, held - self.tail.numel()):held]):
            raise CausalityViolation(f"causality violated: scoring targets from {first} with a cache of {held} tokens "
                               "whose last tokens are not the val stream's (the cache may only hold scored tokens)")

    def nbytes(self) -> int:
        """Bytes held by the tables (keys, running counts, offsets, stream tail)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.cum, self.key_offsets, self.tail))


if triton is not None:
    @triton.jit
    def _ngram_lookup_kernel(keys_ptr, cum_ptr, offsets_ptr, base_ptr, token_ptr, ctx_out_ptr, pair_out_ptr,
                             distinct_out_ptr, n_pos, vocab_size, BLOCK: tl.constexpr):
        # grid (cdiv(n_pos, BLOCK), K). Order k's keys are keys[offsets[k]:offsets[k+1]], its running counts
        # cum[offsets[k]+k : offsets[k+1]+k+1] (one leading 0 per order).
        order = tl.program_id(1)
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        live = p < n_pos
        seg = tl.load(offsets_ptr + order)
        size = tl.load(offsets_ptr + order + 1) - seg
        seg_keys = keys_ptr + seg
        seg_cum = cum_ptr + seg + order
        row = order.to(tl.int64) * n_pos + p
        first = tl.load(base_ptr + row, mask=live, other=0)
        last = first + (vocab_size - 1)
        query = first + tl.load(token_ptr + p, mask=live, other=0)
        # Three branchless lower/upper bounds sharing one trip count: the answer stays in [x, x + span] and
        # span shrinks the same way in every lane. lo = #keys < first, hi = #keys <= last, at = #keys < query.
        lo = tl.zeros([BLOCK], dtype=tl.int64)
        hi = lo
        at = lo
        span = size
        while span > 1:
            half = span // 2
            # x + half < size while span > 1, so these loads stay inside the segment (dead lanes included)
            lo = tl.where(tl.load(seg_keys + lo + half) < first, lo + half, lo)
            hi = tl.where(tl.load(seg_keys + hi + half) <= last, hi + half, hi)
            at = tl.where(tl.load(seg_keys + at + half) < query, at + half, at)
            span -= half
        # last step: each answer is x or x + 1; x < size unless the segment is empty (then x = 0 is the answer)
        some = live & (lo < size)
        lo += tl.where(some & (tl.load(seg_keys + lo, mask=some, other=0) < first), 1, 0)
        hi += tl.where(some & (tl.load(seg_keys + hi, mask=some, other=0) <= last), 1, 0)
        at += tl.where(some & (tl.load(seg_keys + at, mask=some, other=0) < query), 1, 0)
        # the exact pair key is present iff the key at its lower bound equals it
        found = live & (at < size)
        hit = found & (tl.load(seg_keys + at, mask=found, other=0) == query)
        ctx = tl.load(seg_cum + hi, mask=live, other=0) - tl.load(seg_cum + lo, mask=live, other=0)
        below = tl.load(seg_cum + at, mask=live, other=0)
        pair = tl.load(seg_cum + at + tl.where(hit, 1, 0), mask=live, other=0) - below
        tl.store(ctx_out_ptr + row, ctx, mask=live)
        tl.store(pair_out_ptr + row, pair, mask=live)
        # the context's distinct pair keys are keys[lo:hi]
        tl.store(distinct_out_ptr + row, hi - lo, mask=live)


def _lookup_triton(keys, cum, offsets, base, tokens, vocab_size):
    """Launch _ngram_lookup_kernel. keys: [T], cum: [T + K], offsets: [K + 1], base: [K, P] (context key * V),
    tokens: [P]; all int64, contiguous, on one device. Returns (ctx, pair, distinct) int64 [K, P]."""
    assert triton is not None, "triton is not installed"
    n_orders, n_pos = base.shape
    for t in (keys, cum, offsets, base, tokens):
        assert t.dtype == torch.int64 and t.is_contiguous() and t.device == base.device
    assert offsets.shape == (n_orders + 1,) and tokens.shape == (n_pos,) and cum.numel() == keys.numel() + n_orders
    ctx, pair, distinct = torch.empty_like(base), torch.empty_like(base), torch.empty_like(base)
    grid = (triton.cdiv(n_pos, LOOKUP_BLOCK), n_orders)
    _ngram_lookup_kernel[grid](keys, cum, offsets, base, tokens, ctx, pair, distinct, n_pos, vocab_size,
                               BLOCK=LOOKUP_BLOCK, num_warps=LOOKUP_WARPS)
    return ctx, pair, distinct


# -----------------------------
# DOCUMENT CACHE
# -----------------------------
# How far back the document cache looks at most: it bounds each lookup's work (the events between the earliest
# window start and the last target are sorted once per call). 6% of the sample val's tokens lie more than 8192
# tokens into their document.
DOCUMENT_HORIZON = 8192


def window_counts(stream: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor,
                  vocab_size: int, orders) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts inside each position's own history window, exact and batched: (context, pair) int64 [K, P].

    For t = positions[p], lo = starts[p] <= t and order n (row k): the n-grams that lie wholly inside
    stream[lo:t], i.e. end at q with lo + n - 1 <= q < t, whose first n-1 ids equal stream[t-n+1:t]
    (context), and of those, whose last id is targets[p] (pair). Both are 0 where the context does not fit in
    the window (t - n + 1 < lo). context = sum over tokens of pair, because both count the same n-grams.
    stream: [L] int64; positions: [P] int64 in [1, L] (L: the stream may end right before t, as in the audit);
    starts: [P] int64; targets: [P] int64 token ids. Reads stream[lo:t] and nothing at or after t.
    """
    orders = tuple(orders)
    first, end = torch.stack((starts.min(), positions.max())).tolist()  # one device sync for both
    order_col = torch.tensor(orders, device=stream.device)[:, None]

    def bases(at):
        return torch.stack(list(_context_keys(_columns(stream, at, orders[-1]), vocab_size, orders))) * vocab_size

    query_base = bases(positions)
    event_pos = torch.arange(first, end, device=stream.device)
    event_base, event_tokens = bases(event_pos), stream[event_pos]
    fits = positions - order_col + 1 >= starts  # [K, P]: the context lies inside the window
    lo = torch.where(fits, starts + order_col - 1, 0).clamp(min=first, max=end)
    hi = torch.where(fits, positions, 0).clamp(min=first, max=end)
    # all orders at once, as in NgramTables.counts: ids equal iff same order and same context (or context + token)
    n_events = event_pos.numel()
    pair_id, ctx_id = _row_dense_ids(torch.cat([event_base + event_tokens, query_base + targets], dim=1), vocab_size)
    # events whose n-gram starts before the earliest window are never inside any window
    live = event_pos >= first + order_col - 1
    pos, lo, hi = event_pos.expand_as(live), lo.reshape(-1), hi.reshape(-1)
    contexts, pairs = (_EarlierEqual(ids[:, :n_events], pos, end, ids.numel(), live) for ids in (ctx_id, pair_id))
    context = contexts.count_between(ctx_id[:, n_events:].reshape(-1), lo, hi)
    pair = pairs.count_between(pair_id[:, n_events:].reshape(-1), lo, hi)
    return context.view(query_base.shape), pair.view(query_base.shape)


class DocumentCache:
    """One more expert: the n-gram statistics of the current document alone, as a classical cache LM keeps them.

    The global cache counts every earlier token of the val stream, so a document's own repeats (its names, its
    topic words) weigh little against a million other tokens; counted within the document they are sharp
    (README, "The document cache"). At target t the window is stream[lo:t], lo = the last `bos_id` at or before
    t - 1 (the document that the prefix ends in), or t - horizon if that is further back. It depends on the
    prefix only, so it is the same at training (inside one segment) and at evaluation (the val stream).

    The expert is a Dirichlet-smoothed (prior `prior`) chain over the document's orders 1..max_order on top of a
    base distribution (the global cache's highest-order expert):
        p_n(v) = (c_n(ctx, v) + prior * p_{n-1}(v)) / (c_n(ctx) + prior),  p_0 = base, p_n = p_{n-1} where
    c_n(ctx) = 0. Since sum_v c_n(ctx, v) = c_n(ctx) exactly (window_counts), each step keeps a full
    distribution summing to 1, and every token keeps p > 0 where the base is > 0.
    """

    def __init__(self, vocab_size: int, bos_id: int, max_order: int = 4, prior: float = 0.5,
                 horizon: int = DOCUMENT_HORIZON):
        if max_order < 1 or prior <= 0 or horizon < 1:
            raise ValueError(f"DocumentCache needs max_order >= 1, prior > 0, horizon >= 1; got {max_order}, "
                             f"{prior}, {horizon}")
        self.vocab_size, self.bos_id, self.prior, self.horizon = vocab_size, bos_id, prior, horizon
        self.orders = tuple(range(1, max_order + 1))

    def window_starts(self, stream: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """lo [P] int64: where each target's window starts (the last bos_id in stream[t-horizon:t], else
        t - horizon, clamped at 0). Reads only stream[t-horizon:t]."""
        lowest, highest = torch.stack(torch.aminmax(positions)).tolist()  # one device sync for both
        first = max(0, lowest - self.horizon)
        index = torch.arange(first, highest, device=stream.device)
        last_bos = torch.cummax(torch.where(stream[index] == self.bos_id, index, -1), 0).values
        before = (positions - 1 - first).clamp(min=0)
        return torch.maximum(last_bos[before], positions - self.horizon).clamp(min=0)

    def counts(self, stream: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor):
        """(context, pair) int64 [M, P] of the document window before each target (window_counts)."""
        return window_counts(stream, positions, self.window_starts(stream, positions), targets, self.vocab_size,
                             self.orders)

    def probs(self, context: torch.Tensor, pair: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """p(target) float64 [P] of the smoothed chain above `base` ([P], the base distribution's p(target))."""
        p = base.double()
        for c, a in zip(context.double(), pair.double()):
            p = torch.where(c > 0, (a + self.prior * p) / (c + self.prior), p)
        return p


def smoothed_probs(counts: ExpertCounts, vocab_size: int, discounts=0.75, method: str = "absolute") -> torch.Tensor:
    """Each order's interpolated distribution at the target, float64 [K, P], every row a full distribution > 0.

    counts: ExpertCounts with rows in ascending order; vocab_size: V. Row k backs off through rows < k down to
    the uniform 1/V (the classical cache of Kneser & Ney's absolute discounting, without continuation counts):
      absolute:    p_k(v) = (max(c(ctx, v) - D_k, 0) + D_k * u(ctx) * p_{k-1}(v)) / c(ctx)
      witten_bell: p_k(v) = (c(ctx, v) + u(ctx) * p_{k-1}(v)) / (c(ctx) + u(ctx))
    with u(ctx) = distinct continuations, and p_k = p_{k-1} where c(ctx) = 0. Sum over v: since every seen
    token has c(ctx, v) >= 1 >= D_k, sum_v max(c - D, 0) = c(ctx) - D u(ctx), so each row sums to 1 exactly;
    the target's value is all a score needs. discounts (absolute only), each in (0, 1]: a float, K floats (one
    per order), or a float tensor [K, P] whose values depend only on the prefix (e.g. on the order and c(ctx),
    never on the target), so that the same discount serves every candidate token.
    """
    if method not in ("absolute", "witten_bell"):
        raise ValueError(f"method must be 'absolute' or 'witten_bell', got {method!r}")
    n_orders = counts.context.shape[0]
    if isinstance(discounts, torch.Tensor):
        discounts = discounts.double().expand(counts.context.shape)
        ok = bool(((discounts > 0) & (discounts <= 1)).all())
    else:
        discounts = [float(discounts)] * n_orders if np.isscalar(discounts) else [float(d) for d in discounts]
        ok = len(discounts) == n_orders and all(0.0 < d <= 1.0 for d in discounts)
    if not ok:
        raise ValueError(f"discounts must be one float, {n_orders} floats or a [{n_orders}, P] tensor, "
                         f"all in (0, 1]; got {discounts}")
    lower = torch.full(counts.context.shape[1:], 1.0 / vocab_size, dtype=torch.float64, device=counts.pair.device)
    rows = []
    for k in range(n_orders):
        c, pair, u = counts.context[k].double(), counts.pair[k].double(), counts.distinct[k].double()
        seen = c > 0
        if method == "absolute":
            d = discounts[k]
            mass = (pair - d).clamp(min=0) + d * u * lower
            total = c
        else:
            mass, total = pair + u * lower, c + u
        lower = torch.where(seen, mass / torch.where(seen, total, 1.0), lower)
        rows.append(lower)
    return torch.stack(rows)


def expert_features(counts: ExpertCounts, orders) -> torch.Tensor:
    """Prefix-only count features for the gate, float32 [P, 2K + 1]: per order log(1 + c(ctx)) and
    log(1 + u(ctx)) (distinct continuations), then the longest order whose context was seen, divided by the
    largest order (0 if none). counts: ExpertCounts [K, P]; orders: the K orders, ascending."""
    orders_col = torch.tensor(orders, dtype=torch.float32, device=counts.context.device)[:, None]
    longest = torch.where(counts.context > 0, orders_col, 0.0).amax(dim=0) / orders[-1]
    return torch.cat([torch.log1p(counts.context.float()).T, torch.log1p(counts.distinct.float()).T,
                      longest[:, None]], dim=1)


def expert_feature_count(num_experts: int, document_orders: int = 0) -> int:
    # log context count and log distinct continuations per table expert, the longest order seen, and the
    # document cache's log context count per order
    return 2 * num_experts + 1 + document_orders


def expert_inputs(tables: NgramTables, stream: torch.Tensor, positions: torch.Tensor, min_count: int,
                  targets: torch.Tensor | None = None, in_table: torch.Tensor | None = None, *,
                  discount: float, document: DocumentCache | None = None, chunk_start: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts' inputs at each position: (p_k(target) [K, P] float32, valid [K, P] bool, features [P, F]
    float32), the one place where n-gram counts become what the gate mixes (training, evaluation and the
    legality audit all call it). Experts are the tables' orders >= 2.

    Counts (NgramTables.counts): at evaluation, the cache holds stream[0:cache.num_tokens] and a target at t also
    counts the chunk's own tokens before t (from chunk_start, default cache.num_tokens); in training (in_table:
    [K_tables, L] bool, which of the stream's n-grams the frozen tables hold) the table's own n-grams at or after
    t are left out, so the gate trains on counts that look like the cache's. A training stream that the tables do
    not hold at all is counted with chunk_start 0 instead: the same counts, without the leave-future-out work.
    The target at t is stream[t], or targets[p] when given (then the stream may end right before t, for the
    audit's candidate enumeration).
    Expert k is the order-n interpolated absolute-discounting distribution backing off through the lower orders
    to the uniform (ngram_mixer.smoothed_probs), a full distribution > 0 summing to 1. It is valid where its
    context was seen at least `min_count` times; the gate ignores the others. Features depend on the context
    only (never on the target), so they are the same for every candidate token.
    document: the document cache joins as the last expert, smoothed on top of the highest table order; it counts
    the same stream (in training: the segment, so a document that began before it is seen from its start)."""
    counts = tables.counts(stream, positions, targets, chunk_start, in_table)
    experts = [k for k, n in enumerate(tables.orders) if n >= 2]
    expert_counts = ExpertCounts(counts.context[experts], counts.pair[experts], counts.distinct[experts])
    smoothed = smoothed_probs(counts, tables.vocab_size, discount)
    probs = smoothed[experts].float()
    valid = expert_counts.context >= max(min_count, 1)
    features = expert_features(expert_counts, tuple(tables.orders[k] for k in experts))
    if document is not None:
        stream, positions = stream.long(), positions.long()
        doc_context, doc_pair = document.counts(stream, positions, stream[positions] if targets is None else targets)
        probs = torch.cat([probs, document.probs(doc_context, doc_pair, smoothed[-1]).float()[None]])
        valid = torch.cat([valid, doc_context[:1] > 0])
        features = torch.cat([features, torch.log1p(doc_context.float()).T], dim=1)
    return probs, valid, features


def no_expert_inputs(n_experts: int, rows: int, n_features: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """expert_inputs' shapes with no valid expert: mixture_weights then gives the neural slot all the weight."""
    return (torch.zeros(n_experts, rows, device=device),
            torch.zeros(n_experts, rows, dtype=torch.bool, device=device),
            torch.zeros(rows, n_features, device=device))


def table_mask(orders: tuple[int, ...], stream_positions: torch.Tensor, prefill_tokens: int) -> torch.Tensor:
    """[K, L] bool: where the n-gram ending at these train-stream positions was counted into the frozen tables.
    The tables hold stream[0:prefill_tokens]; an n-gram whose window wraps past the end of the stream back to its
    start (position < n-1) was never counted."""
    order = torch.tensor(orders, device=stream_positions.device)[:, None]
    return (stream_positions < prefill_tokens)[None, :] & (stream_positions[None, :] >= order - 1)


def prefill_tables(tokens: torch.Tensor, vocab_size: int, orders: tuple[int, ...],
                   device) -> NgramTables:
    """The frozen tables the gate trains on: orders 1 and `orders` counted over `tokens` ([N] int,
    the first N tokens of the train stream), on `device`. Order 1 is the lowest level the smoothed
    experts back off through before the uniform."""
    tables = NgramTables(vocab_size, (1,) + orders, device=device)
    tables.extend(tokens.to(device, torch.int64))
    return tables


def training_lookup_positions(span_starts: list[int], local_tokens: int, stride: int,
                              device) -> torch.Tensor:
    """[len(span_starts) * (local_tokens // stride)] int64: a training step's mixture targets as
    positions in its segment, in micro-batch order. Span m of the segment starts at span_starts[m]
    and holds local_tokens + 1 tokens; its targets are its positions 1..local_tokens, of which
    every stride-th is looked up (the rows of train_gpt.GPT.mixture_rows). One n-gram lookup per
    step then serves all micro-batches."""
    starts = torch.tensor(span_starts, device=device)[:, None]
    return (starts + torch.arange(stride, local_tokens + 1, stride, device=device)).reshape(-1)


def training_expert_inputs(tables: NgramTables, segment: torch.Tensor, segment_start: int,
                           stream_tokens: int, prefill_tokens: int, positions: torch.Tensor,
                           min_count: int, *, discount: float, document: DocumentCache | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_inputs of a training step's mixture targets, with the frozen tables' leave-future-out.

    segment: [L] int64, the train stream's tokens from index segment_start on (the stream has
    stream_tokens tokens and wraps after its last); tables: prefill_tables of its first
    prefill_tokens tokens; positions: [P] int64 indices into segment (training_lookup_positions).
    A segment that the tables hold none of is counted in the evaluation form (chunk_start 0): the
    same counts, without the table mask's work. Returns expert_inputs' (probs [K, P], valid [K, P],
    features [P, F])."""
    # n-grams the tables hold leave from t on, the others join before t; past the prefill (the usual
    # case) none is held
    end = segment_start + len(segment)
    view = dict(chunk_start=0)  # the eval form (expert_inputs)
    # past the stream's end it wraps to the prefill
    if prefill_tokens and (segment_start < prefill_tokens or end > stream_tokens):
        stream_positions = torch.arange(segment_start, end, device=segment.device) % stream_tokens
        view = dict(in_table=table_mask(tables.orders, stream_positions, prefill_tokens))
    return expert_inputs(tables, segment, positions, min_count, **view, discount=discount,
                         document=document)


class LookupPrefetch:
    """The next training step's lookup (its segment and expert_inputs), made while the device still runs this step.

    On CUDA the lookup is launch-bound: ~420 small kernels and 5 syncs (input checks and bound reads) per call,
    a latency that the step would otherwise wait out. ahead(make) runs make() on a side stream
    right after the step's passes are queued, so those launches and syncs (which wait for the side stream only)
    overlap the model's kernels; take(make) hands the result to the default stream, or makes it now if nothing was
    prepared (the first step, after reset()). make() may read only tensors that the default stream has finished
    writing (the side stream does not wait for it, or it would wait for the step; the trainer's tables and
    positions are made before training starts). On CPU make() runs inline: the same values, computed one step
    earlier."""

    def __init__(self, device):
        # high priority: its small kernels slip in between the model's instead of queueing behind them, and the
        # host, which waits for them at each sync, gets on with its launches
        self.stream = torch.cuda.Stream(device, priority=-1) if torch.device(device).type == "cuda" else None
        self.ready = None

    def ahead(self, make) -> None:
        with torch.cuda.stream(self.stream):  # None (CPU): no stream switch
            self.ready = make()

    def take(self, make):
        if self.ready is None:
            self.ahead(make)
        value, self.ready = self.ready, None
        if self.stream is not None:
            # the default stream waits for the side stream's work, and the caching allocator keeps the tensors
            # made there until the default stream's uses of them are done
            current = torch.cuda.current_stream()
            current.wait_stream(self.stream)
            for tensor in _tensors(value):
                tensor.record_stream(current)
        return value

    def reset(self) -> None:
        """Drop what was prepared (the data stream it came from was rewound)."""
        self.ready = None


def _tensors(value):
    # every tensor in nested tuples / lists
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def mixture_weights(gate_logits: torch.Tensor, expert_valid: torch.Tensor, neural_floor: float) -> torch.Tensor:
    """Mixing weights float32 (float64 for float64 gate logits) [P, 1+K], column 0 neural, rows summing to 1.

    gate_logits: [P, 1+K] float; expert_valid: [K, P] bool; neural_floor in [0, 1]. softmax over the neural slot
    and the valid experts (invalid ones get weight 0), then w0 <- max(w0, neural_floor) with the experts' share
    rescaled to 1 - w0. With no valid expert, w0 = 1.
    """
    if not 0.0 <= neural_floor <= 1.0:
        raise ValueError(f"neural_floor must be in [0, 1], got {neural_floor}")
    slots = torch.cat([expert_valid.new_ones(expert_valid.shape[1], 1), expert_valid.T], dim=1)
    # at least float32; float64 gate logits (the audit) keep float64 so the weights sum to 1 to double precision
    gate_logits = gate_logits.to(torch.promote_types(gate_logits.dtype, torch.float32))
    w = torch.softmax(gate_logits.masked_fill(~slots, float("-inf")), dim=1)
    w0 = w[:, :1].clamp(min=neural_floor)
    share = w[:, 1:].sum(dim=1, keepdim=True)
    # a safe denominator inside where(): a bare 0/0 branch would put NaN into the backward pass
    some = share > 0
    scale = torch.where(some, (1 - w0) / torch.where(some, share, 1.0), 0.0)
    return torch.cat([w0, w[:, 1:] * scale], dim=1)


def mixture_logprob(neural_logprob, expert_probs, expert_valid, weights):
    """log p(target) of the mixture, float32 [P].

    neural_logprob: [P] float, the neural model's log-probability of each target (from a log_softmax over the
    full vocabulary); expert_probs: [K, P] float, p_k(target) in [0, 1] (ignored where invalid); expert_valid:
    [K, P] bool (a valid expert's distribution must sum to 1); weights: [P, 1+K] from mixture_weights().
    Gradients reach neural_logprob and weights.
    """
    # the neural term stays in log space: softmax(neural)[y] can underflow float32 where its log cannot;
    # w0 is >= neural_floor, and the clamp only keeps log() finite when the floor is 0 and w0 underflows
    neural = neural_logprob.float() + torch.log(weights[:, 0].float().clamp(min=torch.finfo(torch.float32).tiny))
    experts = (weights[:, 1:].float() * torch.where(expert_valid, expert_probs.float(), 0.0).T).sum(dim=1)
    some = experts > 0
    log_experts = torch.where(some, torch.log(torch.where(some, experts, 1.0)), float("-inf"))
    return torch.logaddexp(neural, log_experts)


class OnlineGate:
    """The gate keeps learning at evaluation, score first: it learns from a chunk only after every target of the
    chunk has been scored, like test-time training. The gate's training tables can only approximate the eval cache
    (a fixed prefill of train tokens against a cache that grows from empty), so the gate as trained misjudges the
    experts' counts; a few steps per scored chunk correct it (analysis/online_gate.py).

    remember(positions, h, neural_logprob, expert_probs, expert_valid, features) keeps one scored batch's targets
    and mixture inputs (as mixture_weights / mixture_logprob take them); learn(gate_logits, neural_floor, autocast)
    takes `steps` Adam steps on the mean mixture NLL of everything remembered since the last learn, then forgets
    it. gate_logits(h, features) -> [P, 1+K]. Under torch.distributed the gradients are summed over processes
    (each remembers its share of the chunk), so every process keeps the same gate. learned_until: every target
    the gate has learned from, on any process, is < it (the evaluation checks it before scoring).
    """

    def __init__(self, params, steps: int, lr: float):
        self.params, self.steps, self.kept, self.learned_until = list(params), steps, [], 0
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

    def remember(self, positions: torch.Tensor, h: torch.Tensor, neural_logprob: torch.Tensor,
                 expert_probs: torch.Tensor, expert_valid: torch.Tensor, features: torch.Tensor) -> None:
        # targets first in every tensor (the experts' are [K, P]), so learn() joins all batches along dim 0
        self.kept.append((positions, h, neural_logprob, expert_probs.T, expert_valid.T, features))

    def learn(self, gate_logits, neural_floor: float, autocast=contextlib.nullcontext) -> None:
        # torch.cat outside inference mode turns inference tensors into ones autograd may save
        columns = [torch.cat(part) for part in zip(*self.kept)]
        self.kept = []
        device, distributed = self.params[0].device, dist.is_available() and dist.is_initialized()
        until = torch.tensor(int(columns[0].max()) + 1 if columns else 0, device=device)
        count = torch.tensor(float(columns[0].numel()) if columns else 0.0, device=device)
        if distributed:
            dist.all_reduce(until, op=dist.ReduceOp.MAX)
            dist.all_reduce(count)
        self.learned_until = max(self.learned_until, int(until))
        for _ in range(self.steps):
            for p in self.params:
                p.grad = torch.zeros_like(p)  # dense on every process, even one that scored no target here
            if columns:
                _, h, neural_logprob, expert_probs, expert_valid, features = columns
                with autocast():
                    weights = mixture_weights(gate_logits(h, features), expert_valid.T, neural_floor)
                nll = -mixture_logprob(neural_logprob, expert_probs.T, expert_valid.T, weights)
                (nll.sum() / count).backward()
            for p in self.params if distributed else ():
                dist.all_reduce(p.grad)
            self.optimizer.step()


# -----------------------------
# LEGALITY AUDIT
# -----------------------------
# Limits, each a few times the honest error measured (docs/validity.md has the figures):
# - |sum_v p(v) - 1|: float32 log-probabilities summed in float64; honest 1e-7 .. 4e-7, bounded by float32
#   rounding of the log-softmax's normalizer (half an ulp of ln V: 4.8e-7 at V = 8192);
# - |log p(gold) enumerated - log p(gold) scored|: the same rule on batches of two sizes; honest <= 1e-7;
# - the re-score delta: the very batch run again, same shapes and kernels, on a stream whose tokens from t on are
#   random; honest 0 exactly, as nothing before t changed.
AUDIT_MAX_SUM_ERR = 1e-6
AUDIT_MAX_GOLD_ERR = 1e-6
AUDIT_MAX_RESCORE_DELTA = 1e-6
# What each statistic catches, for the failure message.
_AUDIT_CHECKS = (
    ("max_abs_sum_err", AUDIT_MAX_SUM_ERR, "the scored distribution does not sum to 1 over the vocabulary"),
    ("max_gold_logp_err", AUDIT_MAX_GOLD_ERR, "the score is not the scoring rule's probability of the target"),
    ("max_rescore_logp_delta", AUDIT_MAX_RESCORE_DELTA,
     "the distribution changes when the target and every later token are replaced: it reads them"),
)


class CausalityViolation(RuntimeError):
    """A score that is not a probability made from the artifact and the tokens before its target (C1-C4)."""


def replace_tokens_from(tokens: torch.Tensor, first: int, generator: torch.Generator, vocab_size: int):
    """A copy of `tokens` ([N] int64) whose tokens at `first` and after are each replaced by a different random id
    (so none is left by chance): what a causal score at a target < first, or at `first` itself for the
    distribution over its candidates, cannot see."""
    out = tokens.clone()
    shift = torch.randint(1, vocab_size, (len(tokens) - first,), generator=generator, device=tokens.device)
    out[first:] = (tokens[first:] + shift) % vocab_size
    return out


def fresh_seed(device) -> int:
    """A seed no setting determines (os entropy), the same on every process (rank 0's, broadcast): the audit's
    positions cannot be known in advance, from SEED or otherwise."""
    seed = torch.tensor(secrets.randbits(31), dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(seed, src=0)
    return int(seed)


class LegalityAudit:
    """Re-scores sampled val targets the way a reviewer would, from the prefix alone, through the production code.

    At an audited target t of a scored batch, the stream from t on (the target included) is replaced by random
    ids, and the very batch is run again through the production forward (same windows, same shapes, so the same
    kernels) and the production scoring rule. Then:
    - the scored pass's distribution at t (its hidden state and neural log-probabilities, every candidate token
      enumerated through the scoring rule) and the re-run's distribution each sum to 1 (max_abs_sum_err);
    - the scored pass's distribution at the gold token is the logged score (max_gold_logp_err);
    - the re-run's distribution equals the scored pass's over the whole vocabulary, and the re-run's gold
      log-probability equals the score, at t and at every earlier target of the batch (max_rescore_logp_delta).
    A score that reads the target itself (a model input one token ahead, a count that includes t, a boost on
    the gold token in every pass) or any later token, or that the scored pass alone computes differently, moves
    the re-score. What the audit cannot see is state (the cache, TTT and gate weights) that learned from an
    unscored target: the evaluation checks what every learner touched before each batch, and
    records/prove_causality.py re-runs a whole evaluation with the stream replaced after K.
    """

    def __init__(self, positions: torch.Tensor, seed: int):
        """positions: [A] int64 val targets to audit (the same on every rank); seed: the replacement ids'."""
        self.positions, self.seed = positions, seed
        self.generator = torch.Generator(device=positions.device).manual_seed(seed)
        self.count, self.time_ms = 0, 0.0
        # per statistic: the worst value seen and the target it was seen at
        self.worst = {name: (0.0, -1) for name, _, _ in _AUDIT_CHECKS}

    def _note(self, name: str, value: float, t: int) -> None:
        if not value <= self.worst[name][0]:  # a nan is worst of all
            self.worst[name] = (value, t)

    def check(self, score, rescore, tokens, positions, h, log_probs, scored_lp) -> None:
        """Audit the targets of one scored batch that are in `positions`.

        score(h [P, D], neural_lp [P], stream [N], positions [P], targets [P]) -> log p [P]: the production scoring
        rule. rescore(stream [N]) -> (positions [P], h [P, D], log_probs [P, V]): the production forward of this
        batch's windows on another stream. tokens: [N] int64 val stream; positions [P], h [P, D], log_probs [P, V],
        scored_lp [P]: what the scored pass computed and scored."""
        rows = torch.nonzero(torch.isin(positions, self.positions)).flatten().tolist()
        if not rows:
            return
        t0 = time.perf_counter()
        vocab, device = log_probs.size(1), tokens.device
        candidates = torch.arange(vocab, device=device)
        for row in rows:
            t = int(positions[row])
            stream = replace_tokens_from(tokens, t, self.generator, vocab)
            positions_again, h_again, log_probs_again = rescore(stream)
            assert torch.equal(positions_again, positions), "the re-run must score the batch's own targets"
            at_t = torch.full((vocab,), t, device=device)
            scored = score(h[row].expand(vocab, -1), log_probs[row], stream, at_t, candidates)
            again = score(h_again[row].expand(vocab, -1), log_probs_again[row], stream, at_t, candidates)
            for distribution in (scored, again):
                self._note("max_abs_sum_err", abs(float(distribution.double().exp().sum()) - 1.0), t)
            gold = tokens[t]
            self._note("max_gold_logp_err", float((scored[gold] - scored_lp[row]).abs()), t)
            # the batch's targets up to t: their prefixes are untouched, so the re-run must score them the same
            # (the whole batch through the rule, as scored: a batch of another size may round otherwise)
            targets = tokens[positions]
            again_lp = score(h_again, log_probs_again.gather(1, targets[:, None]).squeeze(1), stream, positions,
                             targets)
            earlier = positions <= t
            delta = torch.maximum((again - scored).abs().max(), (again_lp - scored_lp)[earlier].abs().max())
            self._note("max_rescore_logp_delta", float(delta), t)
        self.count += len(rows)
        self.time_ms += 1000.0 * (time.perf_counter() - t0)  # the float() reads above synchronize the device

    @classmethod
    def sampled(cls, tokens: torch.Tensor, bounds: list[int], bos_id: int, count: int, seed: int) -> "LegalityAudit":
        """An audit of about `count` targets of the val stream `tokens` ([N] int64), the same on every rank for
        the same seed: an eighth each from the first chunk, chunks' first targets, chunks' last targets and
        documents' first targets (after BOS), where state changes and off-by-one leaks live, the rest uniform over
        [1, N). bounds: the chunks' target boundaries. A leak on a fraction r of targets is audited with
        probability 1 - (1 - r)^count (r = 1%: 92% at 256, 99.4% at 512)."""
        generator = torch.Generator().manual_seed(seed)
        n = len(tokens)
        edges = torch.tensor(bounds)
        documents = torch.nonzero(tokens[:-1].cpu() == bos_id).flatten() + 1
        pools = (torch.arange(1, bounds[1]), edges[:-1], edges[1:] - 1, documents)
        share = count // 8
        parts = [pool[torch.randint(len(pool), (share,), generator=generator)] for pool in pools if len(pool)]
        parts.append(torch.randint(1, n, (count - sum(map(len, parts)),), generator=generator))
        return cls(torch.unique(torch.cat(parts)).to(tokens.device), seed)

    def reduce(self) -> tuple[int, float, float, float]:
        """(positions, max_abs_sum_err, max_gold_logp_err, max_rescore_logp_delta) over all ranks."""
        stats = torch.tensor([value for value, _ in self.worst.values()], dtype=torch.float64,
                             device=self.positions.device)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=stats.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            dist.all_reduce(stats.nan_to_num_(nan=float("inf")), op=dist.ReduceOp.MAX)
        return int(count[0]), *stats.tolist()

    def worst_target(self, name: str) -> int:
        """Where this process saw its worst value of statistic `name` (-1: nowhere)."""
        return self.worst[name][1]


def audit_line(stats) -> str:
    """The run log's line for LegalityAudit.reduce()'s stats (devkit.parse_log reads it)."""
    count, *errors = stats
    return f"legality_audit positions:{count} " + " ".join(
        f"{name}:{value:.3e}" for (name, _, _), value in zip(_AUDIT_CHECKS, errors))


def audit_failures(stats, audit: LegalityAudit | None = None) -> list[str]:
    """What LegalityAudit.reduce()'s stats show wrong, one message per failed check; empty when the audit passes.
    With `audit`, each message names the target where this process saw the worst value."""
    count, *errors = stats
    found = [] if count > 0 else ["no target was audited"]
    for (name, limit, meaning), value in zip(_AUDIT_CHECKS, errors):
        if not value <= limit:
            target = audit.worst_target(name) if audit is not None else -1
            where = f" (worst at target {target} on this process)" if target >= 0 else ""
            found.append(f"{name}:{value:.3e} > {limit:g}{where}: {meaning}")
    return found


# -----------------------------
# EVALUATION
# -----------------------------
# Every target t in [1, N) of the val stream is scored exactly once, from a distribution over the
# whole vocabulary that depends only on tokens < t (the model's causal window, n-gram counts before
# t); TTT and the online gate learn from a chunk only after all its targets are scored. Before every
# batch the scorer checks that nothing has learned from its targets; LegalityAudit re-scores sampled
# targets; proved_pass proves the pass causal up to K.


class ByteTables(NamedTuple):
    """Per-token byte counts for BPB (the challenge rule), [V] each: UTF-8 bytes of the piece without its '▁',
    whether it starts with '▁', and whether it is a control / unknown / unused token (a boundary)."""
    base_bytes: torch.Tensor
    leading_space: torch.Tensor
    is_boundary: torch.Tensor


def count_target_bytes(prev_ids: Tensor, target_ids: Tensor, byte_tables) -> Tensor:
    """UTF-8 bytes each target token adds to the text; the '▁' space counts unless it follows a boundary."""
    base_bytes, leading_space, is_boundary = byte_tables
    return base_bytes[target_ids].long() + (leading_space[target_ids] & ~is_boundary[prev_ids]).long()




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
    model: torch.nn.Module  # train_gpt.GPT: hidden, logits, gate_logits, neural_floor, gate_parameters
    hidden_fn: object  # model.hidden, compiled on CUDA
    tokens: Tensor  # [N] int64 val stream on the device
    byte_tables: tuple
    seq_len: int
    stride: int
    windows_per_batch: int
    rank: int
    world_size: int
    min_count: int = 2
    autocast: object = nullcontext
    ngram_discount: float = 0.87
    document: DocumentCache | None = None
    # Every target TTT has read, on any rank, is < this index (from the index tensors it trained on).
    ttt_trained_until: int = 0
    # How often each val position has been scored in the current pass ([N] int8): C4 is checked at its end.
    times_scored: Tensor | None = None


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


def scoring_rule(setup: EvalSetup, cache: NgramTables | None, h: Tensor, neural_lp: Tensor, stream: Tensor,
        positions: Tensor, targets: Tensor | None = None, online_gate: OnlineGate | None = None):
    """The scoring rule: log p(target) [P] of the full system and its mixing weights [P, 1+K] (None without the
    cache), from hidden states h [P, D] and the targets' neural log-probabilities [P]; online_gate keeps the inputs."""
    if cache is None:
        return neural_lp, None
    probs, valid, features = expert_inputs(cache, stream, positions, setup.min_count, targets,
                                           discount=setup.ngram_discount, document=setup.document)
    # float64, no autocast: the audit re-scores a target in a batch of another size, where a bf16 gate rounds otherwise
    weights = mixture_weights(setup.model.gate_logits(h.double(), features.double()), valid, setup.model.neural_floor)
    if online_gate is not None:
        online_gate.remember(positions, h, neural_lp, probs, valid, features)
    return mixture_logprob(neural_lp, probs, valid, weights), weights


class TargetRecord:
    """Per-target results of one pass for targets 1..n_targets, in val order (index t - 1): full-system NLL,
    neural NLL, mixing weights, and the neural model's largest log-probability over the vocabulary (its
    confidence, a function of the prefix). Later targets are not kept."""

    def __init__(self, n_targets: int, n_weights: int, device: torch.device):
        # one spare row takes the later targets' writes, so storing needs no mask (and no device sync)
        self.n_targets = n_targets
        nll, neural_nll, neural_top = (torch.zeros(n_targets + 1, dtype=torch.float64, device=device)
                                       for _ in range(3))
        weights = torch.zeros(n_targets + 1, n_weights, dtype=torch.float32, device=device)
        self.rows = (nll, neural_nll, weights, neural_top)
        # the per-target arrays (views of the rows without the spare one), all compared by the causality proof
        self.columns = tuple(row[:n_targets] for row in self.rows)
        self.nll, self.neural_nll, self.weights, self.neural_top = self.columns

    def store(self, positions: Tensor, log_probs: Tensor, neural_lp: Tensor, mixed_lp: Tensor,
              weights: Tensor | None) -> None:
        index = (positions - 1).clamp(max=self.n_targets)
        self.rows[0][index] = -mixed_lp.double()
        self.rows[1][index] = -neural_lp.double()
        if weights is not None:
            self.rows[2][index] = weights.float()
        self.rows[3][index] = log_probs.amax(-1).double()

    def first_difference(self, other: "TargetRecord", n_targets: int, exact: bool) -> tuple[int, float] | None:
        """first_difference of the two records' per-target arrays, bitwise (exact) or within
        PROOF_CUDA_TOLERANCE: CUDA's TTT backward adds in no fixed order."""
        return first_difference(list(self.columns), list(other.columns), n_targets,
                                0.0 if exact else PROOF_CUDA_TOLERANCE)


def first_difference(mine: list[Tensor], theirs: list[Tensor], n_targets: int,
                     tolerance: float = 0.0) -> tuple[int, float] | None:
    """(first target, largest difference) where the per-target arrays (each [N] or [N, K], in val order from
    target 1) differ by more than `tolerance` over targets 1..n_targets; None where they all agree."""
    gaps = [(a[:n_targets].double() - b[:n_targets].double()).abs().reshape(n_targets, -1).amax(1)
            for a, b in zip(mine, theirs) if a.numel()]
    gap = torch.stack(gaps).amax(0)
    bad = torch.nonzero(gap > tolerance).flatten()
    return (int(bad[0]) + 1, float(gap.max())) if len(bad) else None


@torch.inference_mode()
def score_span(setup: EvalSetup, first: int, end: int, cache: NgramTables | None = None,
               audit: LegalityAudit | None = None, record: TargetRecord | None = None,
               online_gate: OnlineGate | None = None) -> Tensor:
    """Score this rank's share of the windows covering targets [first, end); returns [neural NLL, system NLL,
    bytes, tokens] (float64 sums). With `cache`, the n-gram experts join through the model's gate; the cache must
    hold only tokens < first, and TTT and the gate must not have learned from a target >= first (checked before every
    batch, where the scores are made: a violation raises CausalityViolation)."""
    tokens, device = setup.tokens, setup.tokens.device
    start, lo, hi = (t.to(device) for t in window_schedule(first, end, setup.seq_len, setup.stride))
    share = slice(len(start) * setup.rank // setup.world_size, len(start) * (setup.rank + 1) // setup.world_size)
    start, lo, hi = start[share], lo[share], hi[share]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for i in range(0, len(start), setup.windows_per_batch):
        windows = tuple(w[i:i + setup.windows_per_batch] for w in (start, lo, hi))
        positions, h, log_probs = forward_windows(setup, tokens, *windows)
        check_nothing_learned(setup, cache, online_gate, positions)
        if setup.times_scored is not None:
            setup.times_scored.index_add_(0, positions, torch.ones_like(positions, dtype=torch.int8))
        targets = tokens[positions]
        neural_lp = log_probs.gather(1, targets[:, None]).squeeze(1)
        mixed_lp, weights = scoring_rule(setup, cache, h, neural_lp, tokens, positions, online_gate=online_gate)
        if audit is not None:
            audit.check(lambda *a: scoring_rule(setup, cache, *a)[0], lambda stream: forward_windows(setup, stream, *windows),
                        tokens, positions, h, log_probs, mixed_lp)
        if record is not None:
            record.store(positions, log_probs, neural_lp, mixed_lp, weights)
        n_bytes = count_target_bytes(tokens[positions - 1], targets, setup.byte_tables)
        # Sums in float64 and one division at the end (BPB = sum NLL / ln 2 / sum bytes), as nanochat does.
        sums += torch.stack((-neural_lp.double().sum(), -mixed_lp.double().sum(), n_bytes.double().sum(),
                             torch.tensor(float(len(positions)), dtype=torch.float64, device=device)))
    return sums


# The inline causality proof's limit on CUDA, where TTT's backward kernels add in no fixed order, so two runs of
# the same evaluation differ by float noise (unmeasured: bench/gpu_check.sh reports it); on CPU: bitwise.
PROOF_CUDA_TOLERANCE = 1e-3


def check_nothing_learned(setup: EvalSetup, cache: NgramTables | None, online_gate: OnlineGate | None,
                          positions: Tensor) -> None:
    """C3 where the scores are made: no table, TTT step or gate step may have seen a target of this batch."""
    first = int(positions.min())
    if cache is not None:
        cache.check_holds_only_before(setup.tokens, first)
    for learner, until in (("TTT", setup.ttt_trained_until), ("the gate", getattr(online_gate, "learned_until", 0))):
        if until > first:
            raise CausalityViolation(f"causality violated: scoring target {first} after {learner} learned from "
                                     f"targets up to {until - 1}")


def check_scored_once(setup: EvalSetup, end: int, n_bytes: float) -> None:
    """C4 at the end of a pass that scored targets [1, end): each exactly once (over all ranks), and the bytes
    the pass divided by are those targets' bytes."""
    times = all_reduce(setup.times_scored)[1:]
    if not bool((times[:end - 1] == 1).all()) or bool(times[end - 1:].any()):
        wrong = torch.nonzero(times != (torch.arange(1, len(times) + 1, device=times.device) < end)).flatten() + 1
        raise CausalityViolation(f"{len(wrong)} targets were not scored exactly once (target {int(wrong[0])}: "
                                 f"{int(times[wrong[0] - 1])} times)")
    expected = float(count_target_bytes(setup.tokens[:end - 1], setup.tokens[1:end], setup.byte_tables).double().sum())
    if n_bytes != expected:
        raise CausalityViolation(f"the pass divided by {n_bytes:.0f} bytes; its targets hold {expected:.0f}")


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


def eval_val(setup: EvalSetup, record: TargetRecord | None = None, audit: LegalityAudit | None = None) -> EvalResult:
    """The neural model alone over every val target (sliding windows of the setup's stride): one chunk, no cache,
    no TTT. Leaves the model in the mode it found it in (training calls it for its periodic val)."""
    was_training = setup.model.training
    result = evaluate_stream(setup, [1, len(setup.tokens)], None, LearningConfig(), audit, record)
    setup.model.train(was_training)
    return result


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
    target_index = index + 1
    # The high-water mark comes from the indices trained on, not from [first, end): an indexing bug shows.
    until = torch.tensor(int(target_index.max()) + 1 if len(starts) else 0, device=setup.tokens.device)
    setup.ttt_trained_until = max(setup.ttt_trained_until, int(all_reduce(until, dist.ReduceOp.MAX)))
    for group in optimizer.param_groups:
        group["lr"] = lr
    setup.model.train()
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=False)
        if len(starts):
            with setup.autocast():
                logits = setup.model.logits(setup.hidden_fn(setup.tokens[index]))
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), setup.tokens[target_index].reshape(-1),
                                       reduction="sum")
            (loss / (n_seqs * seq_len)).backward()
        if setup.world_size > 1:
            flat = all_reduce(torch.cat([p.grad.reshape(-1) for p in params]))
            for p, grad in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(grad.view_as(p))
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    setup.model.eval()


@dataclass
class LearningConfig:
    epochs: int = 0  # 0 = no test-time training
    lr: float = 0.002
    momentum: float = 0.9
    cosine: bool = True
    grad_clip: float = 1.0
    gate_steps: int = 0  # the online gate's Adam steps per scored chunk; 0 = the gate stays as trained
    gate_lr: float = 0.01


@dataclass
class EvalBudget:
    """EVAL_TIME_BUDGET for one pass: the evaluation must end by `deadline` (time.perf_counter() seconds). After
    each chunk the pass projects its end from its own pace; when it would overrun, learning stops, TTT first, then
    the online gate. Every target is still scored, and less adaptation never uses more information, so the pass
    stays valid. Learning from a chunk that ends at or before `keep_until` is never skipped: the causality proof
    re-ran those chunks with learning on. `log(msg)` writes the progress and budget lines."""
    deadline: float
    log: object = print
    keep_until: int = 0
    stopped: tuple[str, ...] = ()


def _budget_step(budget: EvalBudget, i: int, bounds: list[int], sums: Tensor, time_ms: dict, started: float,
                 device) -> None:
    """After chunk i: a progress line every ~10% of chunks, and learning switched off when the projected end of
    the pass is past the deadline (the same decision on every rank)."""
    n_chunks, now = len(bounds) - 1, time.perf_counter()
    done, left = i + 1, n_chunks - i - 1
    per_chunk = {k: v / 1000.0 / done for k, v in time_ms.items()}
    learning = [k for k in ("ttt", "gate") if k not in budget.stopped]
    projected = now + left * (per_chunk["score"] + per_chunk["cache"] + sum(per_chunk[k] for k in learning))
    if done % max(1, n_chunks // 10) == 0 or left == 0:
        _, nll, n_bytes, n_tokens = all_reduce(sums.clone()).tolist()
        budget.log(f"eval_progress chunks:{done}/{n_chunks} targets:{int(n_tokens)} "
                   f"val_bpb:{nll / math.log(2.0) / max(n_bytes, 1.0):.4f} elapsed:{now - started:.1f}s "
                   f"projected:{projected - started:.1f}s")
    if bounds[i + 1] <= budget.keep_until or not learning:
        return
    # what each rank would switch off now; the largest answer wins, so every rank switches off the same
    stop, estimate = torch.zeros(2, device=device), projected
    for k, learner in enumerate(learning):
        if estimate <= budget.deadline:
            break
        stop[k] = 1.0
        estimate -= left * per_chunk[learner]
    stop = all_reduce(stop, dist.ReduceOp.MAX)
    for k, learner in enumerate(learning):
        if stop[k] > 0:
            projected -= left * per_chunk[learner]
            budget.stopped += (learner,)
            budget.log(f"eval_budget chunk:{done}/{n_chunks} stopped:{learner} "
                       f"targets_left:{bounds[-1] - bounds[i + 1]} elapsed:{now - started:.1f}s "
                       f"projected:{projected - started:.1f}s")


def evaluate_stream(setup: EvalSetup, bounds: list[int], cache: NgramTables | None, ttt: LearningConfig,
                   audit: LegalityAudit | None = None, record: TargetRecord | None = None,
                   stop_after: int = sys.maxsize, budget: EvalBudget | None = None) -> EvalResult:
    """Score-then-update over the chunks [bounds[i], bounds[i+1]): score every target of the chunk, THEN extend the
    cache with it, THEN learn from it (online gate, TTT). `cache` must start empty (it is identical on all ranks);
    nothing of a chunk reaches the cache or the weights before it is scored."""
    tokens, device = setup.tokens, setup.tokens.device
    online_gate = OnlineGate(setup.model.gate_parameters(), ttt.gate_steps, ttt.gate_lr) \
        if cache is not None and ttt.gate_steps > 0 else None
    # TTT adapts every transformer weight with the CE; the gate learns from the mixture NLL (online_gate).
    params = [p for name, p in setup.model.named_parameters() if not name.startswith(("gate.", "gate_features."))]
    optimizer = torch.optim.SGD(params, lr=ttt.lr, momentum=ttt.momentum) if ttt.epochs > 0 else None
    for p in params:
        # Dense zero grads on every rank, even one without sequences in a chunk, so the all-reduce always matches.
        p.grad = torch.zeros_like(p) if optimizer else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    setup.times_scored = torch.zeros(len(tokens), dtype=torch.int8, device=device)
    time_ms = dict(score=0.0, cache=0.0, gate=0.0, ttt=0.0)
    setup.model.eval()

    def timed(key, fn, *fn_args):
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = fn(*fn_args)
        sync()
        time_ms[key] += 1000.0 * (time.perf_counter() - t0)
        return out

    n_learn = len(bounds) - 2  # the last chunk is never learned from
    started = time.perf_counter()
    for i, (first, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        sums += timed("score", score_span, setup, first, end, cache, audit, record, online_gate)
        if budget is not None:
            _budget_step(budget, i, bounds, sums, time_ms, started, device)
        if i == n_learn or end > stop_after:
            break  # nothing is left to score, so the last chunk need not be learned from
        if cache is not None:
            timed("cache", cache.extend, tokens[cache.num_tokens:end])
        stopped = budget.stopped if budget is not None else ()
        if online_gate is not None and "gate" not in stopped:
            timed("gate", online_gate.learn, setup.model.gate_logits, setup.model.neural_floor, setup.autocast)
        elif online_gate is not None:
            online_gate.kept = []  # remembered for a step that will not come
        if optimizer is not None and "ttt" not in stopped:
            lr = ttt.lr * (0.5 * (1 + math.cos(math.pi * i / n_learn)) if ttt.cosine else 1.0)
            timed("ttt", ttt_on_chunk, setup, optimizer, params, first, end, ttt.epochs, lr, ttt.grad_clip)
    if audit is not None:
        time_ms["score"] -= audit.time_ms
        time_ms["audit"] = audit.time_ms
    time_ms["total"] = sum(time_ms.values())
    neural_nll, nll, n_bytes, n_tokens = all_reduce(sums).tolist()
    check_scored_once(setup, end, n_bytes)
    for tensor in record.columns if record is not None else ():
        all_reduce(tensor)  # every target was written by exactly one rank, the others hold zeros there
    return EvalResult(nll / n_tokens, nll / math.log(2.0) / n_bytes, neural_nll / n_tokens, int(n_tokens),
                      int(n_bytes), time_ms, audit.reduce() if audit is not None else None)


def proof_target(bounds: list[int], generator: torch.Generator) -> int:
    """K of the inline causality proof: in the second or third chunk, the first scored after
    learning (the first chunk if it is the only one), half the time at the chunk's first target,
    else anywhere in it."""
    chunk = min(len(bounds) - 2, 1 + int(torch.randint(2, (1,), generator=generator)))
    first, end = bounds[chunk], bounds[chunk + 1]
    after = int(torch.randint(first, end, (1,), generator=generator))
    at_edge = bool(torch.rand(1, generator=generator) < 0.5)
    return min(first if at_edge else after, bounds[-1] - 2)


def proved_pass(setup: EvalSetup, bounds: list[int], new_cache, ttt: LearningConfig,
                audit: LegalityAudit | None, record: TargetRecord | None, seed: int,
                vocab_size: int, n_weights: int, device: torch.device,
                budget: EvalBudget | None = None
                ) -> tuple[EvalResult, float, int, tuple[int, float] | None]:
    """The scored pass (evaluate_stream) preceded by its inline causality proof: the same
    evaluation, from the model's current weights, of the chunks up to a fresh target K on the val
    stream with every token after K replaced. Every loss up to K must match the scored pass's:
    nothing learned from a later token (through any state, however it was recorded) may reach them.
    K = proof_target(bounds) drawn with `seed`; new_cache() gives each pass its own empty cache
    (None without the mixer); record (a TargetRecord of every target, or None) keeps the scored
    pass's per-target results; n_weights: the gate's slots (TargetRecord); budget: the scored
    pass's EVAL_TIME_BUDGET, which may stop learning only past K. Returns (result, the
    proof's time in ms, K, the first difference (target, change) or None where the two agree)."""
    after = proof_target(bounds, torch.Generator().manual_seed(seed))
    val_tokens, initial = setup.tokens, {k: v.clone() for k, v in setup.model.state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(seed)
    setup.tokens = replace_tokens_from(val_tokens, after + 1, generator, vocab_size)
    replaced = TargetRecord(after, n_weights, device)
    proof = evaluate_stream(setup, bounds, new_cache(), ttt, None, replaced, stop_after=after)
    setup.tokens, setup.ttt_trained_until = val_tokens, 0
    setup.model.load_state_dict(initial)
    kept = record if record is not None else TargetRecord(after, n_weights, device)
    if budget is not None:
        budget.keep_until = after
    # A fresh cache: the training-time tables are never consulted at evaluation.
    result = evaluate_stream(setup, bounds, new_cache(), ttt, audit, kept, budget=budget)
    difference = kept.first_difference(replaced, after, exact=device.type != "cuda")
    return result, proof.time_ms["total"], after, difference


def context_last_seen(tokens: Tensor, orders: tuple[int, ...], vocab_size: int) -> tuple[Tensor, Tensor]:
    """For each target t = 1..N-1 of a token stream ([N] int64): the longest order n of `orders` (ascending)
    whose context tokens[t-n+1:t] ended an earlier n-gram, i.e. precedes some earlier target s < t, and t - s
    for the latest such s; (0, 0) where no context was seen. ([N-1] int64 each.) The cache's counts at t see
    the same n-grams (every one before t), so order n here is the longest context the cache has counts for.
    Contexts are compared through their exact or 63-bit hashed keys (_context_keys). Reads only tokens < t."""
    targets = torch.arange(1, len(tokens), device=tokens.device)
    order = torch.zeros_like(targets)
    distance = torch.zeros_like(targets)
    keys = _context_keys(_columns(tokens, targets, orders[-1]), vocab_size, orders)
    for n, key in zip(orders, keys):
        # where t < n-1 the context would reach before the stream: a key of its own (-t - 1) never matches
        key = torch.where(targets >= n - 1, key, -targets - 1)
        sorted_keys, index = torch.sort(key, stable=True)  # equal keys keep val order
        repeat = torch.zeros_like(targets, dtype=torch.bool)
        repeat[1:] = sorted_keys[1:] == sorted_keys[:-1]
        previous = torch.full_like(targets, -1)
        previous[index[1:]] = torch.where(repeat[1:], targets[index[:-1]], -1)
        seen = previous >= 0
        order = torch.where(seen, n, order)
        distance = torch.where(seen, targets - previous, distance)
    return order, distance


def model_context(n_tokens: int, seq_len: int, stride: int) -> Tensor:
    """[n_tokens - 1] int64: how many tokens the scoring window of each target t = 1..n_tokens-1 reads before it
    (window_schedule's windows over the whole stream)."""
    start, lo, hi = window_schedule(1, n_tokens, seq_len, stride)
    return torch.arange(1, n_tokens) - torch.repeat_interleave(start, hi - lo)


def write_eval_dump(path: Path, record: TargetRecord, result: EvalResult, setup: EvalSetup, bos_id: int,
                    run_id: str, orders: tuple[int, ...], expert_names: list[str]) -> None:
    """EVAL_DUMP: per-target arrays in val order (t = 1..N-1) and the pass's scores, as an npz file. Its
    nll.sum() / (ln 2 * bytes.sum()) is the logged val_bpb up to float64 summation order. Besides the scores,
    for analysis (analysis/mixer_gain.py), each a function of the prefix: the neural model's top
    log-probability, the longest cache context seen before and how far back (context_last_seen over `orders`),
    and the tokens the model's window read (model_context). expert_names: the gate_weights columns."""
    tokens = setup.tokens
    n_bytes = count_target_bytes(tokens[:-1], tokens[1:], setup.byte_tables)
    doc_id = torch.cumsum((tokens == bos_id).long(), 0)[1:] - 1
    vocab_size = setup.byte_tables.base_bytes.numel()
    longest, last_seen = context_last_seen(tokens, orders, vocab_size) if orders else (None, None)
    arrays = dict(nll=record.nll, neural_nll=record.neural_nll, bytes=n_bytes, doc_id=doc_id,
                  positions=torch.arange(1, len(tokens), device=tokens.device), gate_weights=record.weights,
                  neural_top_logprob=record.neural_top,
                  model_context=model_context(len(tokens), setup.seq_len, setup.stride))
    if orders:
        arrays.update(longest_order=longest, last_seen=last_seen)
    np.savez(path, **{k: v.cpu().numpy() for k, v in arrays.items()}, val_bpb=np.float64(result.val_bpb),
             val_loss=np.float64(result.val_loss), run_id=np.str_(run_id),
             expert_names=np.array(expert_names, dtype=np.str_))
