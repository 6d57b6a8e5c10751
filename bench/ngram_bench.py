"""Throughput of ngram_mixer.NgramTables (extend and lookup, all orders) against a plain numpy reference.

Run:  python bench/ngram_bench.py [--device cuda] [--tokens N]

Reads the sample val shard from ../shared/data beside the repo (or $SAMPLE_DATA_DIR), repeated if --tokens asks
for more. On CPU: extend and lookup of --tokens tokens (default 1M) next to numpy (np.unique on the same keys,
np.searchsorted), whose arrays and counts must equal ours. With --device cuda also: one extend of 100M tokens,
32K-token extends into that table (the eval cache's pattern), and a lookup of 1M positions x all orders with the
Triton kernel and the torch path (median of triton.testing.do_bench), which must agree exactly.
On either device: expert_inputs for one evaluation batch (4,096 and 65,536 targets; on CUDA also 1M), the
table experts alone against the same plus the document cache (DocumentCache, orders 1-4), side by side; on CUDA
their outputs must equal the CPU's. Then one training step's expert_inputs at NGRAM_TRAIN_STRIDE 1, 4 and 16 (CPU:
configs/sample_cpu.env's step; CUDA: the 1-GPU trainer bench's step, and one rank's share on 8 GPUs), past the
prefill, and both ways of leaving out masked events (ngram_mixer._drops_masked), which must give equal experts.
The reference column is numpy's figure, or the first of a side-by-side (tables alone; stride 1; the default
masking).
"""
import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import ngram_mixer as nm  # noqa: E402
from devkit import SAMPLE_TRAIN_SHARD, SAMPLE_VAL_SHARD  # noqa: E402

VOCAB, ORDERS = 1024, (2, 3, 4, 5, 6, 7)


def load_tokens(n):
    raw = np.fromfile(SAMPLE_VAL_SHARD, dtype="<u2", offset=256 * 4).astype(np.int64)
    return np.tile(raw, -(-n // raw.size))[:n]


def numpy_pair_keys(tokens, n):
    """Pair keys of the n-grams ending at t = n-1 .. N-1, by the module's key rule written independently in
    numpy uint64 (wrapping, logical shifts), so equal arrays cross-check the torch key code."""
    count = tokens.size - n + 1
    if n * nm._bits(VOCAB) <= 63:
        key = np.zeros(count, dtype=np.int64)
        for i in range(n):
            key = key * VOCAB + tokens[i:i + count]
        return key
    u, bits = tokens.astype(np.uint64), nm._bits(VOCAB)
    chain, word, in_word = np.zeros(count, dtype=np.uint64), np.zeros(count, dtype=np.uint64), 0
    for j in range(1, n):
        word = word + u[n - 1 - j:n - 1 - j + count] * np.uint64(VOCAB**in_word)
        in_word += 1
        if in_word == 63 // bits or j == n - 1:
            h = chain + word + np.uint64(nm._GAMMA % 2**64)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(nm._MIX1 % 2**64)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(nm._MIX2 % 2**64)
            chain, word, in_word = h ^ (h >> np.uint64(31)), np.zeros_like(word), 0
    ctx = (chain & np.uint64((1 << (63 - bits)) - 1)).astype(np.int64)
    return ctx * VOCAB + tokens[n - 1:]


def numpy_extend(tokens):
    tables = {}
    for n in ORDERS:
        keys, counts = np.unique(numpy_pair_keys(tokens, n), return_counts=True)
        tables[n] = keys, np.concatenate([[0], np.cumsum(counts)])
    return tables


def numpy_lookup(tables, tokens):
    out = {}
    for n in ORDERS:
        keys, cum = tables[n]
        query = numpy_pair_keys(tokens, n)
        base = query - tokens[n - 1:]
        lo = np.searchsorted(keys, base)
        hi = np.searchsorted(keys, base + VOCAB - 1, side="right")
        at = np.searchsorted(keys, query)
        hit = keys[np.minimum(at, keys.size - 1)] == query
        out[n] = cum[hi] - cum[lo], cum[at + hit] - cum[at]
    return out


def timed(fn, device):
    """Wall time of one call (synchronizing CUDA) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def race(fns, device, repeat=7):
    """Best time of each function over `repeat` alternating rounds (so load drift hits all alike), last results."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            seconds, results[i] = timed(fn, device)
            best[i] = min(best[i], seconds)
    return best, results


def bench_cpu(n_tokens, rows):
    cpu = torch.device("cpu")
    tokens = load_tokens(n_tokens)
    stream = torch.from_numpy(tokens)
    positions = torch.arange(n_tokens)

    def ours_extend():
        tables = nm.NgramTables(VOCAB, ORDERS)
        tables.extend(stream)
        return tables

    (t_ours, t_ref), (tables, ref) = race([ours_extend, lambda: numpy_extend(tokens)], cpu)
    for n in ORDERS:
        assert np.array_equal(tables.pair_keys[n].numpy(), ref[n][0]), f"keys differ at order {n}"
        assert np.array_equal(tables.cum_counts[n].numpy(), ref[n][1]), f"counts differ at order {n}"
    rows.append(("cpu extend, tokens/s", n_tokens / t_ours, n_tokens / t_ref))

    chunk = 32768

    def chunked_extend():
        chunked = nm.NgramTables(VOCAB, ORDERS)
        for start in range(0, n_tokens, chunk):
            chunked.extend(stream[start:start + chunk])
        return chunked

    t_chunked, chunked = timed(chunked_extend, cpu)
    assert torch.equal(chunked.keys, tables.keys) and torch.equal(chunked.cum, tables.cum)
    rows.append((f"cpu extend in {chunk}-token chunks, tokens/s", n_tokens / t_chunked, None))

    (t_ours, t_ref), ((ctx, pair), ref_counts) = race([lambda: tables.lookup(stream, positions),
                                                        lambda: numpy_lookup(ref, tokens)], cpu)
    for k, n in enumerate(ORDERS):
        assert np.array_equal(ctx[k, n - 1:].numpy(), ref_counts[n][0]), f"context counts differ at order {n}"
        assert np.array_equal(pair[k, n - 1:].numpy(), ref_counts[n][1]), f"pair counts differ at order {n}"
    lookups = n_tokens * len(ORDERS)
    rows.append(("cpu lookup, positions x orders/s", lookups / t_ours, lookups / t_ref))
    distinct = tables.keys.numel()
    rows.append(("distinct n-grams (all orders)", distinct, None))
    rows.append(("bytes per distinct n-gram", tables.nbytes() / distinct, None))
    print(f"cpu: {n_tokens:,} tokens, hashed orders {tables.hashed_orders}, threads {torch.get_num_threads()}")


def bench_cuda_lookup(tables, label, rows):
    """Median time of a 1M-position lookup (all orders) with each backend, and of the kernel alone."""
    from triton.testing import do_bench

    stream = torch.from_numpy(load_tokens(1_000_000)).to(tables.device)
    positions = torch.arange(stream.numel(), device=tables.device)
    results, times = {}, {}
    for backend in ("triton", "torch"):
        tables.backend = backend
        results[backend] = tables.lookup(stream, positions)
        times[backend] = do_bench(lambda: tables.lookup(stream, positions), return_mode="median")
    assert all(torch.equal(a, b) for a, b in zip(results["triton"], results["torch"])), "triton != torch"
    assert results["torch"][1].sum() > 0
    rows.append((f"cuda lookup 1M x 6 orders, {label}, ms: triton | torch", times["triton"], times["torch"]))
    columns = nm._columns(stream, positions, max(ORDERS))
    base = torch.stack(list(nm._context_keys(columns, VOCAB, ORDERS))) * VOCAB
    kernel_ms = do_bench(lambda: nm._lookup_triton(tables.keys, tables.cum, tables.key_offsets, base, stream, VOCAB),
                         return_mode="median")
    rows.append((f"cuda lookup kernel alone, {label}, ms", kernel_ms, None))


def bench_cuda(rows):
    cuda = torch.device("cuda")
    big = torch.from_numpy(load_tokens(100_000_000)).to(cuda)
    warm = nm.NgramTables(VOCAB, ORDERS, device=cuda)
    warm.extend(big[:1_000_000])
    warm.lookup(big[:100_000], torch.arange(100_000, device=cuda))

    def one_extend():
        tables = nm.NgramTables(VOCAB, ORDERS, device=cuda)
        tables.extend(big)
        return tables

    (t_ext,), (tables,) = race([one_extend], cuda, repeat=2)
    rows.append(("cuda extend 100M tokens (sample repeated), s (target <= 2)", t_ext, None))
    rows.append(("  distinct n-grams in that table", tables.keys.numel(), None))
    bench_cuda_lookup(tables, "sample table", rows)
    del tables

    # an eval-cache-sized table: 12M uniform random tokens give ~60M distinct n-grams (eval ends near 62M tokens)
    eval_tables = nm.NgramTables(VOCAB, ORDERS, device=cuda)
    generator = torch.Generator(cuda).manual_seed(0)
    eval_tables.extend(torch.randint(0, VOCAB, (12_000_000,), device=cuda, generator=generator))
    rows.append(("  distinct n-grams in the eval-sized table", eval_tables.keys.numel(), None))
    chunk, steps = 32768, 20
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        eval_tables.extend(big[i * chunk:(i + 1) * chunk])
    torch.cuda.synchronize()
    per_extend_ms = (time.perf_counter() - start) / steps * 1e3
    rows.append((f"cuda extend of {chunk} tokens into the eval-sized table, ms", per_extend_ms, None))
    bench_cuda_lookup(eval_tables, "eval-sized table", rows)
    print(f"cuda: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}")


def bench_expert_inputs(device, rows):
    """Wall time of expert_inputs for one eval batch of targets after a 1M-token cache: the table experts alone,
    then with the document cache, alternating rounds on the same inputs. Orders, min count, discount and the
    document cache are train_gpt's defaults (its Hyperparameters), so the bench follows them."""
    import train_gpt

    args = train_gpt.Hyperparameters()
    stream = torch.from_numpy(load_tokens(2_000_000)).to(device)
    tables = nm.NgramTables(VOCAB, (1,) + args.ngram_orders, device=device)
    tables.extend(stream[:1_000_000])
    document = args.document_cache(bos_id=1)
    if device.type == "cuda":  # the same inputs on CPU must give the same experts
        cpu_tables = nm.NgramTables(VOCAB, (1,) + args.ngram_orders)
        cpu_tables.extend(stream[:1_000_000].cpu())
    # on CUDA also a whole 1M-target chunk: all experts for 1M positions, against the 6-order lookup's 1.45 ms
    for batch in (4096, 65536) + ((1_000_000,) if device.type == "cuda" else ()):
        positions = torch.arange(1_000_000, 1_000_000 + batch, device=device)
        (t_tables, t_both), (_, both) = race([
            lambda: nm.expert_inputs(tables, stream, positions, args.ngram_min_count, discount=args.ngram_discount),
            lambda: nm.expert_inputs(tables, stream, positions, args.ngram_min_count, discount=args.ngram_discount,
                                     document=document)], device)
        if device.type == "cuda" and batch <= 65536:
            on_cpu = nm.expert_inputs(cpu_tables, stream.cpu(), positions.cpu(), args.ngram_min_count,
                                      discount=args.ngram_discount, document=document)
            for name, got, expect in zip(("probs", "valid", "features"), both, on_cpu):
                assert torch.allclose(got.cpu().double(), expect.double(), rtol=1e-5, atol=1e-7), name
        # the ratio column: how many times the time of the table experts alone
        rows.append((f"{device.type} expert_inputs, {batch:,} targets, ms: + document cache | tables alone",
                     t_both * 1e3, t_tables * 1e3))


def other_masking(fn):
    """fn run with masked-out events left out the device's other way (ngram_mixer._drops_masked): on CUDA dropped
    (smaller sorts, but a device sync per drop, where the default keeps them as neutral entries and never syncs),
    on CPU kept as neutral entries."""
    default = nm._drops_masked

    def call():
        with mock.patch.object(nm, "_drops_masked", lambda device: not default(device)):
            return fn()
    return call


def bench_training_lookup(device, rows, local_tokens, world_size=1, strides=(1, 4, 16)):
    """Wall time of one training step's expert_inputs on the last rank (train_gpt.next_batch's call: frozen tables
    of a 1M-token prefill that holds the segment, leave-future-out, the document cache). The segment is 8
    micro-batches of local_tokens targets; the last of world_size ranks looks up its 8 / world_size of them, every
    stride-th (NGRAM_TRAIN_STRIDE): the mixer's step overhead and what the stride saves. The last rank's targets
    lie furthest into the segment, so past the prefill it counts the most events, and the step waits for it.
    Last, at the largest stride, a segment past the prefill (train tokens the val tables do not hold, counted from
    chunk_start 0): the usual case of a competition run, whose 23M-token prefill is behind it after 44 steps.
    Both largest-stride calls run again with masked events left out the other way (other_masking), which must give
    the same experts: the ratio says whether ngram_mixer._drops_masked picks the faster way for this device."""
    import train_gpt

    args = train_gpt.Hyperparameters()
    stream = torch.from_numpy(load_tokens(1_000_000)).to(device)
    tables = nm.NgramTables(VOCAB, (1,) + args.ngram_orders, device=device)
    tables.extend(stream)
    span = local_tokens + 1
    segment_start = 100_000
    segment = stream[segment_start:segment_start + 8 * span]
    in_table = nm.table_mask(tables.orders, torch.arange(segment_start, segment_start + len(segment), device=device),
                             len(stream))
    names, calls = [], []
    for stride in strides:
        positions = (torch.arange(world_size - 1, 8, world_size, device=device)[:, None] * span +
                     torch.arange(stride, local_tokens + 1, stride, device=device)).reshape(-1)
        names.append(f"stride {stride}")
        calls.append(lambda positions=positions: nm.expert_inputs(
            tables, segment, positions, args.ngram_min_count, in_table=in_table, discount=args.ngram_discount,
            document=args.document_cache(bos_id=1)))
    past = train_gpt.load_data_shard(SAMPLE_TRAIN_SHARD, VOCAB)[:len(segment)].to(device, torch.int64)  # not in them
    names.append(f"stride {strides[-1]}, past the prefill")
    calls.append(lambda: nm.expert_inputs(tables, past, positions, args.ngram_min_count, chunk_start=0,
                                          discount=args.ngram_discount, document=args.document_cache(bos_id=1)))
    other = "masked dropped" if device.type == "cuda" else "masked kept (neutral)"
    names += [f"{names[-2]}, {other}", f"{names[-1]}, {other}"]
    calls += [other_masking(calls[-2]), other_masking(calls[-1])]
    times, results = race(calls, device)
    twins = len(strides) + 1  # the index of the first other-masking call
    for i in range(twins, len(calls)):
        for what, got, expect in zip(("probs", "valid", "features"), results[i], results[i - 2]):
            # the same integer counts; the tolerance only spares the float ops of a GPU any atomics' ordering
            assert torch.allclose(got.double(), expect.double(), rtol=1e-6, atol=0), \
                f"{names[i]}: {what} differ from the default masking's"
    for i, (name, seconds) in enumerate(zip(names, times)):
        # the ratio column: against stride 1, or for an other-masking row against its default twin
        ref = times[i - 2] if i >= twins else times[0] if i else None
        name = f"{device.type} train expert_inputs, {8 // world_size} x {local_tokens:,}, {name}, ms"
        rows.append((name, seconds * 1e3, ref * 1e3 if ref is not None else None))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tokens", type=int, default=1_000_000, help="tokens for the CPU comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (numpy's reference uses one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    bench_cpu(args.tokens, rows)
    bench_expert_inputs(torch.device("cpu"), rows)
    bench_training_lookup(torch.device("cpu"), rows, 1024)  # configs/sample_cpu.env's step
    if args.device == "cuda":
        bench_cuda(rows)
        bench_expert_inputs(torch.device("cuda"), rows)
        # a step of the 1-GPU trainer bench (8 micro-batches), and one rank's of the same batch on 8 GPUs
        bench_training_lookup(torch.device("cuda"), rows, 65536)
        bench_training_lookup(torch.device("cuda"), rows, 65536, world_size=8)
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'figure':{width}s} {'ours':>14s} {'reference':>14s} {'ours/ref':>9s}")
    for name, ours, ref in rows:
        ratio = f"{ours / ref:9.2f}" if ref is not None and ("/s" in name or "|" in name or "stride" in name) else ""
        ref_text = f"{ref:14,.2f}" if ref is not None else ""
        print(f"{name:{width}s} {ours:14,.2f} {ref_text:>14s} {ratio}")


if __name__ == "__main__":
    main()
