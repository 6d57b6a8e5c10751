"""Download the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face Hub.

    python data/download.py --variant sp8192      # what train_gpt.py's defaults read: val + 80 train shards
    python data/download.py --variant sp8192 --train-shards 10   # community sp8192 export (see VARIANTS)
    python data/download.py                       # sp1024 (configs/baseline_2024.env): val + 80 shards (~16 GB)
    python data/download.py --train-shards 1      # smoke test: sp1024 val + one train shard (~330 MB)

Files land in data/datasets/fineweb10B_<variant>/ and data/tokenizers/ (or under --out-dir), the layout
train_gpt.py reads (its defaults: the sp8192 folders). The remote repo keeps them under a doubled prefix, e.g.
datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin and datasets/tokenizers/fineweb_1024_bpe.model,
as the challenge's data/cached_challenge_fineweb.py expects.

Resumable: a file already in place is skipped (a shard only if its header and size check out; a bad one
is fetched again). The hub writes into a staging folder under datasets/ and resumes its own partial
transfers there; a finished file is moved into place atomically, so a present file is a whole file.
Offline or an unreachable hub: a message naming the repo and file, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)
from tqdm import tqdm

# Shard format (same as build_shards.py and train_gpt.py): 256 little-endian int32 header
# [SHARD_MAGIC, SHARD_VERSION, n_tokens, 0, ...], then n_tokens little-endian uint16 token ids.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4

REMOTE_ROOT = "datasets"
STAGING_DIR = Path("datasets") / ".hf_download"


@dataclass(frozen=True)
class Variant:
    repo_id: str
    dataset_dir: str
    tokenizer_stem: str


# sp1024 is the official export. sp8192 is not in the official repo; the SP8192 records download it
# from kevclark/parameter-golf, which uses the same layout, so only the default repo differs.
VARIANTS = {
    "sp1024": Variant("willdepueoai/parameter-golf", "fineweb10B_sp1024", "fineweb_1024_bpe"),
    "sp8192": Variant("kevclark/parameter-golf", "fineweb10B_sp8192", "fineweb_8192_bpe"),
}


class DownloadError(RuntimeError):
    pass


def plan_downloads(variant: str, train_shards: int, remote_root: str = REMOTE_ROOT) -> list[tuple[str, Path]]:
    """(remote path in the repo, local path relative to --out-dir) for every file the arguments ask for."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown --variant {variant!r}; choose from {sorted(VARIANTS)}")
    if train_shards < 0:
        raise ValueError(f"--train-shards must be >= 0, got {train_shards}")
    v = VARIANTS[variant]
    root = f"{remote_root.strip('/')}/" if remote_root.strip("/") else ""
    shard_names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    plan = [(f"{root}datasets/{v.dataset_dir}/{name}", Path("datasets") / v.dataset_dir / name) for name in shard_names]
    for suffix in (".model", ".vocab"):
        name = v.tokenizer_stem + suffix
        plan.append((f"{root}tokenizers/{name}", Path("tokenizers") / name))
    return plan


def shard_is_complete(path: Path) -> bool:
    """True when `path` holds a whole shard: magic, version, and file size = header + 2 * n_tokens."""
    try:
        size = path.stat().st_size
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError:
        return False
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        return False
    return size == HEADER_BYTES + 2 * int(header[2])


def is_complete(path: Path) -> bool:
    if path.suffix == ".bin":
        return shard_is_complete(path)
    # Tokenizer files have no header to check; files only ever appear here by an atomic move.
    return path.is_file() and path.stat().st_size > 0


def pending_downloads(plan: list[tuple[str, Path]], out_dir: Path) -> list[tuple[str, Path]]:
    """The part of `plan` whose local file is missing or incomplete."""
    return [(remote, local) for remote, local in plan if not is_complete(out_dir / local)]


def fetch(repo_id: str, remote_path: str, dest: Path, staging: Path) -> None:
    """Download one file of the dataset repo to `dest`, via the hub's resumable local_dir mode in `staging`."""
    where = f"{remote_path!r} from Hugging Face dataset {repo_id!r}"
    try:
        staged = hf_hub_download(repo_id=repo_id, filename=remote_path, repo_type="dataset", local_dir=staging)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as exc:
        # The hub raises LocalEntryNotFoundError when it cannot connect and has no local copy.
        raise DownloadError(
            f"cannot download {where}: the Hugging Face Hub is unreachable ({exc.__class__.__name__}). "
            "Check the network connection (and HF_HUB_OFFLINE / HF_ENDPOINT), then rerun: finished files are kept."
        ) from exc
    except (RemoteEntryNotFoundError, RepositoryNotFoundError) as exc:
        raise DownloadError(f"{where}: no such file, or a private repo (check --variant, --train-shards)") from exc
    except Exception as exc:
        # Anything else (HTTP 5xx, a transfer cut off after the hub's own retries, a full disk) still deserves a
        # message naming the file; the hub keeps the partial transfer in `staging` for the next run.
        raise DownloadError(f"cannot download {where}: {exc.__class__.__name__}: {exc}; rerun to resume") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, dest)
    if dest.suffix == ".bin" and not shard_is_complete(dest):
        dest.unlink()
        raise DownloadError(f"downloaded {where} but it is not a valid shard (bad header or size); rerun to retry")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="sp1024", choices=sorted(VARIANTS), help="tokenizer family")
    parser.add_argument("--train-shards", type=int, default=80,
                        help="train shards to fetch, fineweb_train_000000.. (100M tokens each; sp1024 has 80)")
    parser.add_argument("--repo-id", default=None, help="dataset repo (default: the variant's, see VARIANTS)")
    parser.add_argument("--remote-root", default=REMOTE_ROOT, help="folder inside the repo holding the export")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent,
                        help="receives datasets/fineweb10B_<variant>/ and tokenizers/ (default: this script's folder)")
    args = parser.parse_args(argv)
    repo_id = args.repo_id or VARIANTS[args.variant].repo_id
    try:
        plan = plan_downloads(args.variant, args.train_shards, args.remote_root)
    except ValueError as exc:
        parser.error(str(exc))
    todo = pending_downloads(plan, args.out_dir)
    print(f"{repo_id}: {len(plan)} files, {len(plan) - len(todo)} already complete in {args.out_dir}", flush=True)
    staging = args.out_dir / STAGING_DIR
    try:
        for remote, local in tqdm(todo, desc="files", unit="file"):
            fetch(repo_id, remote, args.out_dir / local, staging)
    except DownloadError as exc:
        sys.exit(f"download.py: error: {exc}")
    # Every file is in place; the staging folder holds only the hub's bookkeeping now.
    shutil.rmtree(staging, ignore_errors=True)
    print(f"done: {args.out_dir / 'datasets' / VARIANTS[args.variant].dataset_dir}", flush=True)


if __name__ == "__main__":
    main()
