"""Where the mixer's gain comes from, and how it shrinks as the model gets stronger.

  python analysis/mixer_gain.py DUMP.npz [--out analysis/figures/mixer_gain.png]
  python analysis/mixer_gain.py --ladder A.npz B.npz ... [--out analysis/figures/mixer_strength.png]

DUMP is a run's EVAL_DUMP (train_gpt.py with EVAL_DUMP=path.npz). The gain of a target is its neural NLL minus the
full system's, both from the same pass; with TTT on, the neural NLL is the adapted model's.

One dump: the summed gain split three ways, each a partition of the targets:
  context     how far back the longest context the cache had counts for (order 2..7) was last seen: within the
              model's window (the whole earlier n-gram among the tokens the window read), beyond it, or never;
  top expert  the gate's slot with the largest weight (the neural model, a table order, the document cache);
  confidence  the neural model's largest probability over the vocabulary, in four bins.
Per group: share of targets and bytes, the group's own BPB gain, its contribution to the whole gain (Σ group gain
/ ln 2 / all bytes; the contributions of a split add up to the total) and that contribution's share. Intervals:
records/compare.py's paired bootstrap over documents. The picture shows the contributions.

--ladder: one dump per model, all scored on the same targets; per model the neural BPB, the system's, the gain with
its interval and the beyond-window share of the gain, then a power law gain = a * neural_bpb^b fitted on log axes
and its projection at --project (1.06, the public frontier), with an interval from refitting on every bootstrap
resample (the same documents drawn for every model). The picture adds PR #1642's points (see PUBLIC_POINTS).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from records.compare import bpb, load_dump, ratio_bootstrap  # noqa: E402

# What mixer_gain needs beyond records/compare.py's arrays (train_gpt's EVAL_DUMP writes them with the mixer on).
GAIN_ARRAYS = ("neural_top_logprob", "model_context", "longest_order", "last_seen", "expert_names")
CONFIDENCE_BINS = (0.0, 0.25, 0.5, 0.75, 1.0 + 1e-9)
# PR #1642 (openai/parameter-golf, "Causal N-gram Logit Blend", exact order-4 counts, add-0.5, logits + α log p):
# its README gives each model's neural loss in nats per token and the peak gain in BPB; the neural BPB here is
# nats / ln 2 / bytes per token (its README: 2.41 for sp1024, 3.66 for sp8192), derived, not stated there.
PUBLIC_POINTS = (  # (label, neural nats per token, bytes per token, gain in BPB)
    ("2L128 sp1024 800 steps", 4.665, 2.41, 0.0515),
    ("2L128 sp1024 2500 steps", 4.145, 2.41, 0.0224),
    ("4L256 sp1024 2000 steps", 3.811, 2.41, 0.0079),
    ("4L256 sp1024 4000 steps", 3.640, 2.41, 0.00341),
    ("4L256 sp8192 2000 steps", 5.625, 3.66, 0.00223),
    ("4L256 sp8192 4000 steps", 5.114, 3.66, 0.00018),
)


def load_gain_dump(path: Path) -> dict:
    """load_dump's checked arrays, plus the mixer's (GAIN_ARRAYS); ValueError naming the file otherwise."""
    dump = load_dump(path)
    missing = [key for key in GAIN_ARRAYS if key not in dump]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}: not a dump of a run with the mixer on, or written "
                         "before these fields existed")
    return dump


def splits(dump: dict) -> dict[str, dict[str, np.ndarray]]:
    """The three partitions of the targets: {split: {group: bool mask [N]}}."""
    order, distance = dump["longest_order"], dump["last_seen"]
    seen = order > 0
    within = seen & (distance + order - 1 <= dump["model_context"])
    top = dump["gate_weights"].argmax(axis=1)
    confidence = np.exp(dump["neural_top_logprob"])
    bins = CONFIDENCE_BINS
    return {
        "context": {"within window": within, "beyond window": seen & ~within, "never seen": ~seen},
        "top expert": {str(name): top == k for k, name in enumerate(dump["expert_names"]) if (top == k).any()},
        "confidence": {f"p_max {lo:.2f}-{min(hi, 1):.2f}": (confidence >= lo) & (confidence < hi)
                       for lo, hi in zip(bins[:-1], bins[1:])},
    }


def gain_table(dump: dict, resamples: int, seed: int) -> list[dict]:
    """One row per (split, group): targets, bytes, own BPB gain and contribution with their intervals."""
    gain = dump["neural_nll"] - dump["nll"]
    n_bytes, docs = dump["bytes"].astype(np.float64), dump["doc_id"]
    total_bits = math.log(2) * n_bytes.sum()
    total = gain.sum() / total_bits
    rows = []
    for split, groups in splits(dump).items():
        for group, mask in groups.items():
            if not mask.any():
                continue
            with np.errstate(invalid="ignore"):  # a small group can be missing from a resample: NaN there
                own = ratio_bootstrap(gain * mask, math.log(2) * n_bytes * mask, docs, resamples, seed)
            part = ratio_bootstrap(gain * mask, math.log(2) * n_bytes, docs, resamples, seed)
            rows.append(dict(split=split, group=group, targets=mask.mean(), bytes=n_bytes[mask].sum() / n_bytes.sum(),
                             own=bpb(gain[mask], n_bytes[mask]), own_low=own.low,
                             own_high=own.high, part=part.delta_bpb, part_low=part.low, part_high=part.high,
                             share=part.delta_bpb / total))
    return rows


def format_table(rows: list[dict], dump: dict, path: Path) -> str:
    n_bytes = dump["bytes"].sum()
    neural, system = bpb(dump["neural_nll"], dump["bytes"]), bpb(dump["nll"], dump["bytes"])
    lines = [f"{path}: {dump['nll'].size:,} targets, {int(n_bytes):,} bytes, {np.unique(dump['doc_id']).size:,} "
             f"documents; neural {neural:.4f} BPB, system {system:.4f}, gain {neural - system:.4f}",
             "",
             "| split | group | targets | bytes | own gain (BPB) [95%] | contribution [95%] | share of gain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['group']} | {r['targets']:.1%} | {r['bytes']:.1%} | "
                     f"{r['own']:.4f} [{r['own_low']:.4f}, {r['own_high']:.4f}] | "
                     f"{r['part']:.4f} [{r['part_low']:.4f}, {r['part_high']:.4f}] | {r['share']:.1%} |")
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported only when a picture is asked for)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_split(rows: list[dict], title: str, out: Path) -> None:
    plt = pyplot()
    split_names = list(dict.fromkeys(r["split"] for r in rows))
    fig, axes = plt.subplots(1, len(split_names), figsize=(5 * len(split_names), 3.6))
    for ax, split in zip(np.atleast_1d(axes), split_names):
        group = [r for r in rows if r["split"] == split]
        y = np.arange(len(group))
        err = np.array([[r["part"] - r["part_low"], r["part_high"] - r["part"]] for r in group]).T
        ax.barh(y, [r["part"] for r in group], xerr=err, color="tab:blue", capsize=3)
        ax.set_yticks(y, [f"{r['group']}\n({r['targets']:.0%} of targets)" for r in group], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(split)
        ax.set_xlabel("contribution to the gain (BPB)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def ladder(paths: list[Path], resamples: int, seed: int, project: float) -> tuple[list[dict], dict]:
    """Per dump: neural and system BPB, the gain and the beyond-window share with intervals, and each bootstrap
    resample's (neural BPB, gain) for the fit; then the power-law fit and its projection at `project`."""
    points, reference = [], None
    for path in paths:
        dump = load_gain_dump(path)
        if reference is not None and not (np.array_equal(dump["positions"], reference["positions"])
                                          and np.array_equal(dump["doc_id"], reference["doc_id"])):
            raise ValueError(f"{path} does not score the same targets as {paths[0]}")
        reference = reference or dump
        denominator = math.log(2) * dump["bytes"].astype(np.float64)
        gain = dump["neural_nll"] - dump["nll"]
        beyond = splits(dump)["context"]["beyond window"]
        # one seed for all: each resample draws the same documents for every model and every statistic
        neural = ratio_bootstrap(dump["neural_nll"], denominator, dump["doc_id"], resamples, seed)
        gained = ratio_bootstrap(gain, denominator, dump["doc_id"], resamples, seed)
        beyond_part = ratio_bootstrap(gain * beyond, denominator, dump["doc_id"], resamples, seed)
        share = beyond_part.deltas / gained.deltas
        points.append(dict(path=str(path), run_id=str(dump["run_id"]), neural=neural.delta_bpb,
                           system=neural.delta_bpb - gained.delta_bpb, gain=gained.delta_bpb, gain_low=gained.low,
                           gain_high=gained.high, beyond_share=beyond_part.delta_bpb / gained.delta_bpb,
                           beyond_low=float(np.quantile(share, 0.025)), beyond_high=float(np.quantile(share, 0.975)),
                           neural_draws=neural.deltas, gain_draws=gained.deltas))
    fit = power_law_fit(points, project)
    return points, fit


def power_law_fit(points: list[dict], project: float) -> dict:
    """log gain = log a + b log neural_bpb, least squares over the ladder, on the point estimates and on each
    bootstrap resample; the projection at `project` with the resamples' 95% percentile interval."""
    x = np.log([p["neural"] for p in points])
    y = np.log([p["gain"] for p in points])
    slope, intercept = np.polyfit(x, y, 1)
    draws_x = np.log(np.stack([p["neural_draws"] for p in points]))
    draws_y = np.log(np.stack([p["gain_draws"] for p in points]))
    projections = []
    for xs, ys in zip(draws_x.T, draws_y.T):
        b, a = np.polyfit(xs, ys, 1)
        projections.append(math.exp(a + b * math.log(project)))
    low, high = np.quantile(projections, [0.025, 0.975])
    return dict(slope=slope, intercept=intercept, project=project,
                projection=math.exp(intercept + slope * math.log(project)), low=float(low), high=float(high))


def format_ladder(points: list[dict], fit: dict) -> str:
    lines = ["| run | neural BPB | system BPB | gain [95%] | beyond-window share [95%] |", "|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['run_id']} | {p['neural']:.4f} | {p['system']:.4f} | {p['gain']:.4f} "
                     f"[{p['gain_low']:.4f}, {p['gain_high']:.4f}] | {p['beyond_share']:.1%} "
                     f"[{p['beyond_low']:.1%}, {p['beyond_high']:.1%}] |")
    lines.append(f"\npower law over {len(points)} models: gain = {math.exp(fit['intercept']):.4g} * neural_bpb^"
                 f"{fit['slope']:.2f}; projected gain at {fit['project']} BPB: {fit['projection']:.4f} "
                 f"[{fit['low']:.4f}, {fit['high']:.4f}] (bootstrap refits; an extrapolation, see the docs)")
    return "\n".join(lines)


def plot_ladder(points: list[dict], fit: dict, out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    x = [p["neural"] for p in points]
    err = np.array([[p["gain"] - p["gain_low"], p["gain_high"] - p["gain"]] for p in points]).T
    ax.errorbar(x, [p["gain"] for p in points], yerr=err, fmt="o", color="tab:blue", capsize=3,
                label="this kit, sample val (cache + gate, no TTT)")
    public_x = [nats / math.log(2) / per_token for _, nats, per_token, _ in PUBLIC_POINTS]
    ax.plot(public_x, [g for *_, g in PUBLIC_POINTS], "s", color="tab:red",
            label="PR #1642, order-4 logit blend (neural BPB derived)")
    grid = np.geomspace(fit["project"], max(x + public_x), 50)
    ax.plot(grid, np.exp(fit["intercept"]) * grid ** fit["slope"], "--", color="tab:blue", lw=1,
            label=f"power-law fit, slope {fit['slope']:.2f}")
    ax.errorbar([fit["project"]], [fit["projection"]],
                yerr=[[fit["projection"] - fit["low"]], [fit["high"] - fit["projection"]]], fmt="x",
                color="tab:blue", capsize=3, label=f"projection at {fit['project']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("neural BPB")
    ax.set_ylabel("gain of the n-gram mixing (BPB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", type=Path, nargs="+", help="EVAL_DUMP .npz file(s)")
    parser.add_argument("--ladder", action="store_true", help="one dump per model: the strength curve")
    parser.add_argument("--out", type=Path, default=None, help="the picture (.png); none if not given")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--project", type=float, default=1.06, help="neural BPB to project the gain at")
    args = parser.parse_args(argv)
    if not args.ladder and len(args.dumps) != 1:
        parser.error("one dump, or --ladder with one dump per model")
    if args.ladder and len(args.dumps) < 2:
        parser.error("--ladder needs at least two dumps")
    try:
        if args.ladder:
            points, fit = ladder(args.dumps, args.resamples, args.seed, args.project)
            report = format_ladder(points, fit)
            if args.out:
                plot_ladder(points, fit, args.out)
        else:
            dump = load_gain_dump(args.dumps[0])
            rows = gain_table(dump, args.resamples, args.seed)
            report = format_table(rows, dump, args.dumps[0])
            if args.out:
                plot_split(rows, f"{args.dumps[0].name}: where the mixer's gain comes from", args.out)
    except ValueError as err:
        raise SystemExit(f"mixer_gain.py: {err}")
    print(report)
    return report


if __name__ == "__main__":
    main()
