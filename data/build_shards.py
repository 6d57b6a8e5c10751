"""Encode a .jsonl of documents into token shards in the challenge's binary format.

    # re-encode documents with an existing tokenizer (reproduces the official val shard's prefix byte for byte)
    python data/build_shards.py ../shared/data/fineweb_sample/fineweb_val_head_901docs.jsonl \\
        --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --out-dir /tmp/sp1024 --split val
    # train a new 4096-piece BPE tokenizer on the first 200k documents with the official settings, then encode
    python data/build_shards.py docs.jsonl --train-tokenizer 4096 --tokenizer-train-docs 200000 \\
        --tokenizer data/tokenizers/my_4096_bpe.model --out-dir data/datasets/my_sp4096 --split train

Input: one JSON object per line with a string "text" field; several files are read in the order given.
Each document becomes [BOS] + sp.encode(text) (no EOS), as in the official exporter
(data/download_hf_docs_and_tokenize.py). Documents are concatenated and cut into shards of exactly
--shard-tokens tokens (the last one shorter), named fineweb_<split>_000000.bin, ...; like the official
shards, a document may run across a shard boundary, so a reader that needs document starts must look
for BOS, not shard starts. Shard = 256 little-endian int32 header [20240520, 1, n_tokens, 0, ...] followed
by n_tokens little-endian uint16 ids, so vocabularies above 65536 are refused.

--train-tokenizer VOCAB trains a sentencepiece BPE model first with the settings of the official sp1024
tokenizer (its trainer_spec: bpe, byte_fallback, nmt_nfkc, split_digits, no dummy prefix, character
coverage 0.999, soft vocab limit, pad/bos/eos/unk = 0/1/2/3) and writes --tokenizer and its .vocab.
As in the official run, sentencepiece's default max_sentence_length (4192 bytes) applies, so longer
documents are left out of tokenizer training (they are still encoded into the shards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

# Shard format (same as download.py and train_gpt.py).
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
MAX_VOCAB = 2**16

# Trainer settings read from the official fineweb_1024_bpe.model trainer_spec / normalizer_spec; they match
# the kwargs of the challenge's build_sentencepiece_tokenizer. Only model_prefix, vocab_size and num_threads
# (speed only) are added per run.
OFFICIAL_TRAINER_SETTINGS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def iter_texts(paths: list[Path]) -> Iterator[str]:
    """Yield each document's "text", with errors that name the file and line."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"documents file not found: {path}")
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
                yield doc["text"]


def batched(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(paths: list[Path], model_path: Path, vocab_size: int, max_docs: int | None, threads: int) -> None:
    """Train a BPE sentencepiece model with the official settings; writes model_path and its .vocab."""
    if model_path.suffix != ".model":
        raise ValueError(f"--tokenizer must end in .model when training, got {model_path}")
    if model_path.exists():
        raise ValueError(f"{model_path} already exists; delete it or choose another --tokenizer path")
    if not 256 + 4 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"--train-tokenizer {vocab_size}: must exceed 260 (256 byte pieces + 4 specials) "
                         f"and be <= {MAX_VOCAB}")

    # The official trainer feeds stripped texts with NULs replaced and skips empty ones. Reading them all first
    # costs little (sentencepiece holds every sentence in memory anyway) and keeps input errors out of its C++
    # layer, which would turn them into an opaque RuntimeError.
    texts = []
    for i, text in enumerate(iter_texts(paths)):
        if max_docs is not None and i >= max_docs:
            break
        text = text.replace("\x00", " ").strip()
        if text:
            texts.append(text)
    if not texts:
        raise ValueError(f"no non-empty documents to train the tokenizer on in {', '.join(map(str, paths))}")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(model_path.with_suffix("")), vocab_size=vocab_size,
        num_threads=threads, minloglevel=2, **OFFICIAL_TRAINER_SETTINGS,
    )


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    with path.open("wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def build_shards(paths: list[Path], sp: spm.SentencePieceProcessor, out_dir: Path, split: str, shard_tokens: int,
                 batch_docs: int = 1024, threads: int = 1) -> list[Path]:
    """Encode every document as [BOS] + ids and write shards of `shard_tokens` tokens; returns the shard paths."""
    vocab_size = sp.vocab_size()
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"tokenizer has {vocab_size} pieces; uint16 shards hold at most {MAX_VOCAB}")
    if sp.bos_id() < 0:
        raise ValueError("tokenizer has no BOS piece (bos_id = -1); documents must start with BOS")
    if shard_tokens <= 0:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    # Refuse rather than delete: stale shards of an earlier, longer run would otherwise mix into this one.
    stale = sorted(out_dir.glob(f"fineweb_{split}_*.bin"))
    if stale:
        raise ValueError(f"{out_dir} already holds {len(stale)} fineweb_{split}_*.bin shards; remove them first")
    out_dir.mkdir(parents=True, exist_ok=True)

    buf = np.empty(shard_tokens, dtype=np.uint16)
    fill, written = 0, []

    def flush() -> None:
        nonlocal fill
        path = out_dir / f"fineweb_{split}_{len(written):06d}.bin"
        write_shard(path, buf[:fill])
        written.append(path)
        tqdm.write(f"wrote {path} ({fill:,} tokens)")
        fill = 0

    with tqdm(desc=f"encoding {split}", unit="doc") as bar:
        for batch in batched(iter_texts(paths), batch_docs):
            # Batched encode runs in sentencepiece's C++ threads; one call per document is many times slower.
            docs = sp.encode(batch, out_type=int, add_bos=True, num_threads=threads)
            toks = np.fromiter(chain.from_iterable(docs), dtype=np.uint16, count=sum(map(len, docs)))
            pos = 0
            while pos < len(toks):
                take = min(shard_tokens - fill, len(toks) - pos)
                buf[fill:fill + take] = toks[pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_tokens:
                    flush()
            bar.update(len(batch))
    if fill:
        flush()
    if not written:
        raise ValueError(f"no documents in {', '.join(map(str, paths))}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", nargs="+", type=Path, help='.jsonl files, one {"text": ...} object per line')
    parser.add_argument("--tokenizer", type=Path, required=True,
                        help="sentencepiece .model to encode with (written first when --train-tokenizer is given)")
    parser.add_argument("--train-tokenizer", type=int, metavar="VOCAB", default=None,
                        help="first train a BPE tokenizer of this size on the docs with the official settings")
    parser.add_argument("--tokenizer-train-docs", type=int, default=None,
                        help="train the tokenizer on the first N documents only (default: all)")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for fineweb_<split>_*.bin")
    parser.add_argument("--split", choices=("train", "val"), required=True, help="shard name prefix")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (official: 1e8)")
    parser.add_argument("--batch-docs", type=int, default=1024, help="documents per sentencepiece encode call")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="sentencepiece threads")
    args = parser.parse_args(argv)
    try:
        if args.train_tokenizer is not None:
            train_tokenizer(args.docs, args.tokenizer, args.train_tokenizer, args.tokenizer_train_docs, args.threads)
            print(f"trained {args.tokenizer} ({args.train_tokenizer} pieces)", flush=True)
        if not args.tokenizer.is_file():
            raise FileNotFoundError(f"tokenizer not found: {args.tokenizer}")
        sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer))
        shards = build_shards(args.docs, sp, args.out_dir, args.split, args.shard_tokens, args.batch_docs, args.threads)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"build_shards.py: error: {exc}")
    print(f"done: {len(shards)} {args.split} shard(s) in {args.out_dir}", flush=True)


if __name__ == "__main__":
    main()
