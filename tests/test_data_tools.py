"""Tests for data/build_shards.py and data/download.py (CPU, no network, a few seconds).

    python -m pytest -q tests/test_data_tools.py

The shard builder must reproduce the bundled sample shards byte for byte; the downloader runs against a
fake hf_hub_download that writes into a temporary folder.
"""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
from huggingface_hub.errors import LocalEntryNotFoundError

from conftest import REPO_ROOT, SAMPLE_DATA_DIR, SAMPLE_TOKENIZER, SAMPLE_TRAIN_SHARD, SAMPLE_VAL_SHARD

VAL_DOCS = SAMPLE_DATA_DIR / "fineweb_sample" / "fineweb_val_head_901docs.jsonl"
TRAIN_DOCS = SAMPLE_DATA_DIR / "fineweb_sample" / "casefold_verify_docs_200.jsonl"


def load_script(name):
    # data/ is a folder of scripts, not a package: load each under a unique module name.
    spec = importlib.util.spec_from_file_location(f"data_{name}", REPO_ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_shards = load_script("build_shards")
download = load_script("download")


def read_shard(path):
    """Tokens of a shard, checking the header the way train_gpt.py's reader does."""
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[0] == 20240520 and header[1] == 1 and not header[3:].any(), f"bad header in {path}"
    assert path.stat().st_size == 1024 + 2 * int(header[2]), f"size of {path} does not match its header"
    return np.fromfile(path, dtype="<u2", offset=1024)


def shard_bytes(tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def proto_fields(blob):
    """{field number: last value} of one protobuf message; enough to compare sentencepiece specs."""
    out, i = {}, 0

    def varint():
        nonlocal i
        value = shift = 0
        while True:
            byte = blob[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(blob):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out[field] = varint()
        elif wire == 2:
            n = varint()
            out[field], i = blob[i:i + n], i + n
        elif wire == 5:
            out[field], i = blob[i:i + 4], i + 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return out


def model_specs(model_path):
    # ModelProto: field 2 = TrainerSpec, field 3 = NormalizerSpec.
    model = proto_fields(model_path.read_bytes())
    return proto_fields(model[2]), proto_fields(model[3])


# ----------------------------------------------------------------------------- build_shards.py


@pytest.mark.parametrize("docs, split, expected", [(VAL_DOCS, "val", SAMPLE_VAL_SHARD),
                                                   (TRAIN_DOCS, "train", SAMPLE_TRAIN_SHARD)])
def test_cli_rebuilds_sample_shards_byte_for_byte(tmp_path, docs, split, expected):
    # Run as a script, the way users call it.
    cmd = [sys.executable, str(REPO_ROOT / "data" / "build_shards.py"), str(docs), "--tokenizer", str(SAMPLE_TOKENIZER),
           "--out-dir", str(tmp_path), "--split", split]
    subprocess.run(cmd, check=True, capture_output=True)
    shards = sorted(tmp_path.glob("*.bin"))
    assert [p.name for p in shards] == [f"fineweb_{split}_000000.bin"]
    assert shards[0].read_bytes() == expected.read_bytes()


def test_shard_tokens_splits_stream_exactly(tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE_TOKENIZER))
    shards = build_shards.build_shards([VAL_DOCS], sp, tmp_path, "val", shard_tokens=100_003, batch_docs=64)
    assert [p.name for p in shards] == [f"fineweb_val_{i:06d}.bin" for i in range(11)]
    parts = [read_shard(p) for p in shards]
    assert all(len(p) == 100_003 for p in parts[:-1]) and 0 < len(parts[-1]) <= 100_003
    # Documents run across shard boundaries, so the concatenation is the one-shard stream.
    assert np.array_equal(np.concatenate(parts), read_shard(SAMPLE_VAL_SHARD))


def test_train_tokenizer_mirrors_official_settings(tmp_path):
    docs = tmp_path / "docs.jsonl"
    lines = VAL_DOCS.read_text(encoding="utf-8").splitlines(keepends=True)[:200]
    docs.write_text("".join(lines), encoding="utf-8")
    model = tmp_path / "tok" / "new_512_bpe.model"
    build_shards.main([str(docs), "--train-tokenizer", "512", "--tokenizer", str(model),
                       "--out-dir", str(tmp_path / "shards"), "--split", "train", "--threads", "2"])
    assert model.with_suffix(".vocab").is_file()

    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.vocab_size() == 512
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"] and all(sp.is_byte(i) for i in range(4, 260))
    # Every setting the official tokenizer was trained with, except what must differ.
    new_trainer, new_norm = model_specs(model)
    ref_trainer, ref_norm = model_specs(SAMPLE_TOKENIZER)
    varying = {2, 4, 16}  # model_prefix, vocab_size, num_threads
    assert {k: v for k, v in new_trainer.items() if k not in varying} == \
           {k: v for k, v in ref_trainer.items() if k not in varying}
    # Rule name and add_dummy_prefix=False. Field 2, the compiled nmt_nfkc table, ships with the installed
    # sentencepiece: 0.2.3's normalizes 2 of 1.1M code points (U+061C, U+A7F1) unlike the official build's.
    assert {k: v for k, v in new_norm.items() if k != 2} == {k: v for k, v in ref_norm.items() if k != 2}

    tokens = read_shard(tmp_path / "shards" / "fineweb_train_000000.bin")
    assert tokens.max() < 512 and tokens[0] == 1 and (tokens == 1).sum() == 200
    # The sample texts are already NFKC-normalized, so each document decodes back to its text.
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]
    decoded = [sp.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    assert decoded == [json.loads(line)["text"] for line in lines]

    with pytest.raises(SystemExit, match="already exists"):
        build_shards.main([str(docs), "--train-tokenizer", "512", "--tokenizer", str(model),
                           "--out-dir", str(tmp_path / "other"), "--split", "train"])


@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": broken\n', r"docs\.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n\n', r"docs\.jsonl:2: not valid JSON"),
    ('{"txt": "a"}\n', r'docs\.jsonl:1: expected a JSON object with a string "text" field'),
    ('{"text": 5}\n', r'docs\.jsonl:1: expected a JSON object with a string "text" field'),
    ('["a"]\n', r'docs\.jsonl:1: expected a JSON object'),
    ("", r"no documents"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(content, encoding="utf-8")
    args = [str(docs), "--tokenizer", str(SAMPLE_TOKENIZER), "--out-dir", str(tmp_path / "out"), "--split", "val"]
    with pytest.raises(SystemExit, match=message) as exc:
        build_shards.main(args)
    assert str(exc.value.code).startswith("build_shards.py: error:")


def test_missing_inputs_and_refusals(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "hello"}\n', encoding="utf-8")
    out = ["--out-dir", str(tmp_path / "out"), "--split", "val"]
    with pytest.raises(SystemExit, match="documents file not found: .*nope.jsonl"):
        build_shards.main([str(tmp_path / "nope.jsonl"), "--tokenizer", str(SAMPLE_TOKENIZER), *out])
    with pytest.raises(SystemExit, match="tokenizer not found: .*nope.model"):
        build_shards.main([str(docs), "--tokenizer", str(tmp_path / "nope.model"), *out])
    with pytest.raises(SystemExit, match="must exceed 260"):
        build_shards.main([str(docs), "--train-tokenizer", "200", "--tokenizer", str(tmp_path / "t.model"), *out])

    class HugeVocab:
        def vocab_size(self):
            return 70_000

        def bos_id(self):
            return 1

    with pytest.raises(ValueError, match="uint16"):
        build_shards.build_shards([docs], HugeVocab(), tmp_path / "huge", "val", 1000)
    # A second run into the same folder must not mix its shards with the first run's.
    build_shards.main([str(docs), "--tokenizer", str(SAMPLE_TOKENIZER), *out])
    with pytest.raises(SystemExit, match="already holds 1 fineweb_val"):
        build_shards.main([str(docs), "--tokenizer", str(SAMPLE_TOKENIZER), *out])


# ----------------------------------------------------------------------------- download.py


def test_plan_names_remote_and_local_paths():
    plan = download.plan_downloads("sp1024", 2)
    assert [(remote, str(local)) for remote, local in plan] == [
        ("datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
         "datasets/fineweb10B_sp1024/fineweb_val_000000.bin"),
        ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
         "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"),
        ("datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
         "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"),
        ("datasets/tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.model"),
        ("datasets/tokenizers/fineweb_1024_bpe.vocab", "tokenizers/fineweb_1024_bpe.vocab"),
    ]
    assert len(download.plan_downloads("sp1024", 80)) == 83
    flat = download.plan_downloads("sp8192", 0, remote_root="")
    assert flat[0][0] == "datasets/fineweb10B_sp8192/fineweb_val_000000.bin"
    with pytest.raises(ValueError, match="--train-shards"):
        download.plan_downloads("sp1024", -1)


def test_pending_skips_only_complete_files(tmp_path):
    plan = download.plan_downloads("sp1024", 4)
    shard_dir = tmp_path / "datasets" / "fineweb10B_sp1024"
    shard_dir.mkdir(parents=True)
    good = shard_bytes(np.arange(100))
    (shard_dir / "fineweb_val_000000.bin").write_bytes(good)
    (shard_dir / "fineweb_train_000000.bin").write_bytes(good[:-2])  # truncated transfer
    (shard_dir / "fineweb_train_000001.bin").write_bytes(b"\0" * 4 + good[4:])  # wrong magic
    (shard_dir / "fineweb_train_000002.bin").write_bytes(good)
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model")
    (tmp_path / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"")  # empty: not complete
    pending = [local.name for _, local in download.pending_downloads(plan, tmp_path)]
    assert pending == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000003.bin",
                       "fineweb_1024_bpe.vocab"]


class FakeHub:
    """Stands in for hf_hub_download: writes the file under local_dir/filename as the hub's local_dir mode does."""

    def __init__(self, fail_on=None, error=None, corrupt=False):
        self.calls, self.fail_on, self.error, self.corrupt = [], fail_on, error, corrupt

    def __call__(self, repo_id, filename, *, repo_type, local_dir, **kwargs):
        self.calls.append((repo_id, filename, repo_type))
        if self.fail_on is not None and self.fail_on in filename:
            raise self.error
        path = local_dir / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith(".bin"):
            data = shard_bytes(np.arange(10))
            path.write_bytes(data[:-1] if self.corrupt else data)
        else:
            path.write_text("tokenizer file")
        return str(path)


def test_download_lands_files_and_resumes(tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(download, "hf_hub_download", hub)
    download.main(["--train-shards", "2", "--out-dir", str(tmp_path)])
    assert hub.calls == [("willdepueoai/parameter-golf", remote, "dataset")
                         for remote, _ in download.plan_downloads("sp1024", 2)]
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
                     "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
                     "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                     "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]
    assert np.array_equal(read_shard(tmp_path / files[0]), np.arange(10))
    assert not (tmp_path / "datasets" / ".hf_download").exists()  # staging removed once all files are in place
    # A second run with one more shard fetches only that shard.
    hub.calls.clear()
    download.main(["--train-shards", "3", "--out-dir", str(tmp_path)])
    assert hub.calls == [("willdepueoai/parameter-golf",
                          "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin", "dataset")]


def test_download_variant_uses_its_repo(tmp_path, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(download, "hf_hub_download", hub)
    download.main(["--variant", "sp8192", "--train-shards", "0", "--out-dir", str(tmp_path)])
    assert {c[0] for c in hub.calls} == {"kevclark/parameter-golf"}
    assert (tmp_path / "tokenizers" / "fineweb_8192_bpe.model").is_file()
    assert (tmp_path / "datasets" / "fineweb10B_sp8192" / "fineweb_val_000000.bin").is_file()


def test_download_offline_error_names_repo_and_file(tmp_path, monkeypatch):
    # What the hub raises when it cannot connect (checked against huggingface_hub 2.4 with no network).
    offline = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(fail_on="fineweb_train_000001", error=offline))
    with pytest.raises(SystemExit) as exc:
        download.main(["--train-shards", "3", "--out-dir", str(tmp_path)])
    message = str(exc.value.code)
    assert "willdepueoai/parameter-golf" in message and "fineweb_train_000001.bin" in message
    assert "unreachable" in message
    # What finished before the failure stays, so the next run resumes from there.
    assert (tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").is_file()


def test_download_other_failure_names_file(tmp_path, monkeypatch):
    full_disk = OSError(28, "No space left on device")
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(fail_on="fineweb_1024_bpe.model", error=full_disk))
    with pytest.raises(SystemExit, match=r"cannot download 'datasets/tokenizers/fineweb_1024_bpe\.model' from .*"
                                         r"'willdepueoai/parameter-golf': OSError: .*No space left"):
        download.main(["--train-shards", "0", "--out-dir", str(tmp_path)])


def test_download_rejects_corrupt_shard(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "hf_hub_download", FakeHub(corrupt=True))
    with pytest.raises(SystemExit, match="not a valid shard"):
        download.main(["--train-shards", "0", "--out-dir", str(tmp_path)])
    assert not (tmp_path / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").exists()
