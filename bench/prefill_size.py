"""Which prefill size makes the frozen training tables look like the evaluation cache? (prints figures)

The gate learns how far to trust each n-gram order from the frozen tables; at evaluation the cache grows from
empty to the whole val stream, so it sees a different fraction of known contexts at each step. This measures,
on one stream of same-distribution text (the sample val shard, 1.04M tokens), the per-order rate at which a
target's context has been seen at least NGRAM_MIN_COUNT times:
  eval:     the score-then-update cache over the stream in EVAL_CHUNK_TOKENS chunks, averaged over all targets;
  LOO:      tables of the first P tokens, looked up at those P positions with leave-one-out counts;
  disjoint: tables of the first P tokens, looked up at the next 65,536 positions (not in the tables), which is
            what training sees once it has moved past the prefilled slice of the train stream;
and reports the P/N whose profile is closest to the eval cache's for each.

  python bench/prefill_size.py [--chunk 32768] [--min-count 2]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devkit import SAMPLE_VAL_SHARD  # noqa: E402
from ngram_mixer import NgramTables  # noqa: E402

ORDERS = (2, 3, 4, 5, 6, 7)


def hit_rates(tables, stream, positions, min_count, exclude_self):
    context_count, _ = tables.lookup(stream, positions, exclude_self=exclude_self)
    return (context_count >= min_count).double().mean(dim=1).numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=32768)
    parser.add_argument("--min-count", type=int, default=2)
    args = parser.parse_args()
    stream = torch.from_numpy(np.fromfile(SAMPLE_VAL_SHARD, dtype="<u2", offset=1024).astype(np.int64))
    n = stream.numel()

    cache, weighted = NgramTables(1024, ORDERS), np.zeros(len(ORDERS))
    for first in range(1, n, args.chunk):
        end = min(first + args.chunk, n)
        weighted += hit_rates(cache, stream, torch.arange(first, end), args.min_count, False) * (end - first)
        cache.extend(stream[cache.num_tokens:end])
    eval_profile = weighted / (n - 1)

    rows = []
    for fraction in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75):
        size = int(n * fraction)
        tables = NgramTables(1024, ORDERS)
        tables.extend(stream[:size])
        loo = hit_rates(tables, stream[:size], torch.arange(size), args.min_count, True)
        disjoint = hit_rates(tables, stream, torch.arange(size, size + 65536), args.min_count, False)
        rows.append((fraction, loo, disjoint))

    def show(label, profile):
        distance = np.abs(profile - eval_profile).sum()
        print(f"{label:>24}: " + " ".join(f"{r:.3f}" for r in profile) + f"   L1 distance to eval {distance:.3f}")
        return distance

    print(f"context seen >= {args.min_count} times, by order {ORDERS}; stream {n} tokens, chunk {args.chunk}")
    print(f"{'eval cache (mean)':>24}: " + " ".join(f"{r:.3f}" for r in eval_profile))
    best = {}
    for fraction, loo, disjoint in rows:
        for kind, profile in (("LOO", loo), ("disjoint", disjoint)):
            distance = show(f"{kind} P={fraction:.3f}N", profile)
            if distance < best.get(kind, (None, np.inf))[1]:
                best[kind] = (fraction, distance)
    for kind, (fraction, distance) in best.items():
        print(f"closest {kind}: P = {fraction:.3f} x N (L1 {distance:.3f})  ->  "
              f"{fraction * 62_021_846 / 1e6:.1f}M tokens for the full val set")

if __name__ == "__main__":
    main()
