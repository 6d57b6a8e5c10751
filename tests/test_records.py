"""Tests of run.sh and records/package.py: the record-track rules and the BPB significance test on synthetic logs
(text with the trainer's lines, no trainer run), and parsing, refusals, the record folder and the seeds loop on logs
from real tiny CPU trainer runs (non-record track: they are not 8xH100 runs).

Run:  python -m pytest -q tests/test_records.py      (2-3 minutes on 2 shared CPU cores: seven tiny trainer runs)
"""
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TINY_ENV, log_value, run_trainer
from devkit import Audit, RunLog, log_fields, parse_text
from ngram_mixer import audit_failures

SEEDS = (1, 2, 3)
# VAL_LOSS_EVERY=2 gives loss.png three val points per seed (steps 0, 2, 4).
MIXER_RUN = dict(NGRAM=1, TTT=1, VAL_LOSS_EVERY=2)
# A val_bpb far above the tiny runs' (4 steps), for the significance statement.
SOTA_BPB = 9.0
# The prefix of the last val line, whose train_time is the run's training time.
LAST_VAL = f"step:{TINY_ENV['ITERATIONS']}/{TINY_ENV['ITERATIONS']} val_loss"


def trainer_env(**overrides) -> dict:
    """The environment run_trainer gives train_gpt.py, for running run.sh the same way."""
    env = {k: v for k, v in os.environ.items() if k not in TINY_ENV}
    env.update(TINY_ENV, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # run.sh calls torchrun and python by name: use this interpreter's environment.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """A snapshot of the trainer, run.sh and the packager, so that the runs, the packager's check of the code the
    logs ran and the copies in a record all see the same code even while the repo is being edited."""
    root = tmp_path_factory.mktemp("code")
    for name in ("train_gpt.py", "ngram_mixer.py", "devkit.py", "requirements.txt", "run.sh", "records/package.py"):
        (root / name).parent.mkdir(exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, root / name)
    return root


@pytest.fixture(scope="module")
def pkg(code):
    """records/package.py, imported from the snapshot: its repo root is the snapshot."""
    spec = importlib.util.spec_from_file_location("record_package", code / "records" / "package.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before running: dataclasses resolve the module's string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def seed_runs(code, tmp_path_factory):
    """Three real tiny runs with the n-gram mixer and TTT: {seed: (log path, stdout)}."""
    workdir = tmp_path_factory.mktemp("seeds")
    runs = {}
    for seed in SEEDS:
        proc, _ = run_trainer(workdir, script=code / "train_gpt.py", RUN_ID=f"tiny_seed{seed}", SEED=seed,
                              **MIXER_RUN)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[seed] = (workdir / "logs" / f"tiny_seed{seed}.txt", proc.stdout)
    return runs


@pytest.fixture(scope="module")
def plain_run(code, tmp_path_factory):
    """One real tiny run without the mixer or TTT: its score is the roundtrip line."""
    workdir = tmp_path_factory.mktemp("plain")
    proc, _ = run_trainer(workdir, script=code / "train_gpt.py", RUN_ID="plain", SEED=7, NGRAM=0, TTT=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "logs" / "plain.txt"


@pytest.fixture(scope="module")
def record(pkg, seed_runs, tmp_path_factory):
    """The record folder packaged from the three seed logs."""
    out_root = tmp_path_factory.mktemp("records")
    return pkg.main([*(str(path) for path, _ in seed_runs.values()), "--name", "Tiny Mixer", "--author", "Test Er",
                     "--github-id", "tester", "--blurb", "Tiny CPU runs.", "--date", "2026-01-02", "--non-record",
                     "--sota-val-bpb", str(SOTA_BPB), "--out-root", str(out_root)])


def package(pkg, logs, out_root, *extra) -> Path:
    return pkg.main([*map(str, logs), "--name", "T", "--author", "a", "--out-root", str(out_root), *extra])


def refusal(pkg, logs, out_root, *extra) -> str:
    with pytest.raises(SystemExit) as err:
        package(pkg, logs, out_root, *extra)
    assert not any(Path(out_root).rglob("submission.json")), "a refused record must not be written"
    return str(err.value.code)


def edited_copy(path: Path, dest: Path, edit) -> Path:
    """A copy of a real log with its last line starting with edit[0] replaced by edit[1](line) (None deletes it);
    a None prefix appends edit[1](None) instead. The earlier matches are the logged source, left alone."""
    prefix, new = edit
    lines = path.read_text().splitlines()
    if prefix is None:
        lines.append(new(None))
    else:
        index = max(i for i, line in enumerate(lines) if line.startswith(prefix))
        replacement = new(lines[index])
        lines[index:index + 1] = [] if replacement is None else [replacement]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(lines) + "\n")
    return dest


def set_field(key, value):
    return lambda line: re.sub(rf"\b{key}:\S+", f"{key}:{value}", line)


# ----- parser -----

def test_parse_log_matches_the_log_lines(pkg, seed_runs):
    for seed, (path, _) in seed_runs.items():
        log = path.read_text()
        run = pkg.parse_log(path)
        assert run.seed == seed and run.run_id == f"tiny_seed{seed}" and run.world_size == 1
        assert run.final_line == "final_ngram_ttt_exact" and run.mixer_ran
        assert run.val_loss == log_value(log, "final_ngram_ttt_exact", "val_loss")
        assert run.val_bpb == log_value(log, "final_ngram_ttt_exact", "val_bpb")
        assert run.steps == int(TINY_ENV["ITERATIONS"])
        assert run.train_time_ms == log_value(log, "step:", "train_time")
        assert run.step_avg_ms == log_value(log, f"step:{run.steps}/{run.steps} train_loss", "step_avg")
        # the wall-clock line (artifact read to last score line) is what the 600 s limit counts
        assert run.eval_time_ms == log_value(log, "eval_wallclock", "eval_wallclock")
        assert run.eval_time_ms >= log_value(log, "eval_time", "total")
        assert run.code_sha256 == next(ln for ln in log.splitlines() if ln.startswith("code_sha256:")).split(":")[1]
        total_line = next(ln for ln in log.splitlines() if ln.startswith("Total submission size"))
        assert (run.quant, run.bytes_total) == ("int8_zstd", int(total_line.split()[-2]))
        code_line = next(ln for ln in log.splitlines() if ln.startswith("Code size:"))
        assert run.bytes_code == int(code_line.split()[-2])
        audit = log_fields(log, "legality_audit")
        assert run.audit == Audit(int(audit["positions"]), audit["max_abs_sum_err"], audit["max_gold_logp_err"],
                                  audit["max_rescore_logp_delta"], int(audit["seed"]))
        assert not run.audit_old_format and run.audit.failures() == []
        assert run.ngram_orders == (2, 3, 4, 5, 6, 7)
        tokenizer = next(ln for ln in log.splitlines() if ln.startswith("tokenizer path:"))
        assert run.tokenizer.path == TINY_ENV["TOKENIZER_PATH"] and run.tokenizer.vocab_size == 1024
        assert run.tokenizer.sha256 == hashlib.sha256(Path(TINY_ENV["TOKENIZER_PATH"]).read_bytes()).hexdigest()
        assert tokenizer.endswith(run.tokenizer.sha256)
        assert run.val_tokens == int(TINY_ENV["VAL_MAX_TOKENS"]) == run.scored_tokens + 1
        assert run.scored_bytes == log_value(log, "scored_tokens", "scored_bytes")
        val_lines = [ln for ln in log.splitlines() if re.match(r"step:\d+/\d+ val_loss:", ln)]
        assert [s for s, _ in run.val_curve] == [float(ln.split("train_time:")[1].split("ms")[0]) for ln in val_lines]
        assert [b for _, b in run.val_curve] == [float(ln.split("val_bpb:")[1].split()[0]) for ln in val_lines]
        assert len(run.val_curve) == 3 and not run.stopped_early and not run.over_cap and not run.audit_failed
        assert run.hparams["ngram"] == "True" and run.hparams["seed"] == str(seed)


def test_parser_ignores_the_logged_source(pkg, seed_runs):
    # The log file starts with the trainer's source, full of these formats in f-strings; stdout has no source.
    path, stdout = seed_runs[1]
    text = path.read_text()
    assert "===== train_gpt.py =====" in text and "===== train_gpt.py =====" not in stdout
    assert text.count("final_ngram_ttt_exact") > stdout.count("final_ngram_ttt_exact")
    from_file, from_stdout = asdict(pkg.parse_log(path)), asdict(pkg.parse_text(stdout, path))
    # The hardware line is written to the file only.
    assert from_file.pop("hardware") == "CPU" and from_stdout.pop("hardware") is None
    assert from_file == from_stdout


def test_steady_step_time_leaves_out_the_prefill_and_the_first_steps():
    # train lines of an H200 run: step 1 carries the 6 s n-gram prefill, so step_avg (513 ms) overstates the step
    curve = [(1, 6453), (10, 10428), (20, 14754), (40, 23522), (60, 32380), (80, 41078)]
    text = "\n".join(f"step:{s}/80 train_loss:3.0000 train_time:{t}ms step_avg:{t / s:.2f}ms" for s, t in curve)
    run = parse_text(text, Path("run.txt"))
    assert run.train_curve == [(s, float(t)) for s, t in curve] and run.step_avg_ms == 513.48
    assert run.steady_step_ms == pytest.approx((41078 - 14754) / 60)
    assert parse_text(text.splitlines()[0], Path("run.txt")).steady_step_ms is None


def test_parse_plain_run_scores_the_roundtrip(pkg, plain_run, tmp_path):
    log = plain_run.read_text()
    run = pkg.parse_log(plain_run)
    # No mixer and no TTT: the roundtrip pass is the final one, and it is audited too.
    assert run.final_line == "final_int8_zstd_roundtrip_exact" and not run.mixer_ran and run.audit.failures() == []
    assert run.ngram_orders == ()
    assert run.val_loss == log_value(log, "final_int8_zstd_roundtrip_exact", "val_loss")
    assert run.eval_time_ms == log_value(log, "eval_wallclock", "eval_wallclock")
    assert run.eval_time_ms >= log_value(log, "final_int8_zstd_roundtrip ", "eval_time")
    # One seed: no std and no t-test.
    dest = package(pkg, [plain_run], tmp_path, "--non-record", "--sota-val-bpb", "9")
    assert "a t-test needs at least 2 seeds" in (dest / "README.md").read_text()
    assert json.loads((dest / "submission.json").read_text())["seeds"] == [7]


# ----- refusals on real logs (non-record track: the checks of both tracks) -----

REFUSALS = {
    "missing final exact line": (("final_ngram_ttt_exact", lambda line: None), "no final exact line"),
    "artifact total over the cap": (("Total submission size", lambda line: re.sub(r"\d+ bytes$", "16000001 bytes",
                                                                                    line)), "exceeds the cap"),
    "ARTIFACT_OVER_CAP line": ((None, lambda _: "ARTIFACT_OVER_CAP total:16000001 cap:16000000"),
                               "ARTIFACT_OVER_CAP"),
    "legality audit missing": (("legality_audit", lambda line: None), "no legality_audit line"),
    "legality audit error": (("legality_audit", set_field("max_gold_logp_err", "2.000e-06")),
                             "legality audit failed: max_gold_logp_err:2.000e-06 > 1e-06"),
    "legality audit not causal": (("legality_audit", set_field("max_rescore_logp_delta", "3.000e-03")),
                                  "legality audit failed: max_rescore_logp_delta:3.000e-03 > 1e-06"),
    "legality audit before the causal audit": (
        ("legality_audit", lambda _: "legality_audit positions:32 max_abs_sum_err:1.000e-07 max_gold_err:2.000e-07"),
        "audit line predates the re-score audit"),
    "legality audit without the target replaced": (
        ("legality_audit", lambda _: "legality_audit positions:32 max_abs_sum_err:1.000e-07 "
                                     "max_gold_logp_err:2.000e-07 max_future_logp_delta:0.000e+00"),
        "audit line predates the re-score audit"),
    "LEGALITY_AUDIT_FAILED line": ((None, lambda _: "LEGALITY_AUDIT_FAILED: a scored distribution does not sum to 1"),
                                   "LEGALITY_AUDIT_FAILED"),
    "missing model_params line": (("model_params:", lambda line: None), "cannot tell whether the n-gram mixer ran"),
    "missing tokenizer line": (("tokenizer path:", lambda line: None), "the record must name its tokenizer"),
    "different tokenizer": (("tokenizer path:", set_field("sha256", "0" * 64)), "seeds used different tokenizers"),
    "different code": (("code_sha256:", lambda line: "code_sha256:" + "0" * 64), "seeds ran different code"),
    "different settings": (("hparam iterations:", lambda line: "hparam iterations:5"), "settings differ"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_log_and_the_reason(pkg, seed_runs, tmp_path, case):
    edit, reason = REFUSALS[case]
    logs = [path for path, _ in seed_runs.values()]
    logs[1] = edited_copy(logs[1], tmp_path / "edited" / logs[1].name, edit)
    message = refusal(pkg, logs, tmp_path / "out", "--non-record")
    assert reason in message
    assert any(reason in line and str(logs[1]) in line for line in message.splitlines()), message


def test_unedited_logs_are_accepted(pkg, seed_runs, tmp_path):
    # The control for the refusals: the same logs without the edit make a (non-record) record folder.
    dest = package(pkg, [path for path, _ in seed_runs.values()], tmp_path, "--non-record")
    assert (dest / "submission.json").is_file() and dest.parent.name == "track_non_record_16mb"


def test_real_cpu_logs_are_refused_on_the_record_track(pkg, seed_runs, tmp_path):
    message = refusal(pkg, [path for path, _ in seed_runs.values()], tmp_path, "--sota-val-bpb", str(SOTA_BPB))
    path = seed_runs[1][0]
    for reason in ("world_size:1", "hardware 'CPU' is not an H100", "hparam val_max_tokens:4096"):
        assert f"{path}: {reason}" in message


def test_refuses_duplicate_seeds_and_an_existing_folder(pkg, seed_runs, tmp_path):
    path = seed_runs[1][0]
    assert "seed 1 appears twice" in refusal(pkg, [path, path], tmp_path / "dup", "--non-record")
    dest = package(pkg, [path], tmp_path, "--non-record")
    readme = (dest / "README.md").read_bytes()
    with pytest.raises(SystemExit) as err:
        package(pkg, [seed_runs[2][0]], tmp_path, "--non-record")
    assert "already exists" in str(err.value.code) and str(dest) in str(err.value.code)
    assert (dest / "README.md").read_bytes() == readme
    assert json.loads((dest / "submission.json").read_text())["seeds"] == [1]


def test_cli_exits_nonzero_naming_the_log(code, seed_runs, tmp_path):
    bad = edited_copy(seed_runs[1][0], tmp_path / "bad.txt", ("final_ngram_ttt_exact", lambda line: None))
    proc = subprocess.run([sys.executable, str(code / "records" / "package.py"), str(bad), "--name", "X",
                           "--author", "a", "--non-record", "--out-root", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and f"{bad}: no final exact line" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


# ----- synthetic logs: the record track -----
# Full-size 8xH100 logs written as text: the trainer's lines with made-up numbers (val set 62,021,846 tokens; the
# byte count is made up too). Each test edits one line, so the refusal it expects is the only one.

VAL_TOKENS = 62_021_846
SCORED_BYTES = 151_080_891
H100 = "NVIDIA H100 80GB HBM3"


def synthetic_log(pkg, dest: Path, seed: int, val_bpb: float, settings=None, **lines) -> Path:
    """A log of an 8xH100 record-track run scoring val_bpb; settings={name: value} changes hparam lines and
    lines={key: text or None} replaces or drops the lines under that key."""
    val_loss = val_bpb * math.log(2) * SCORED_BYTES / (VAL_TOKENS - 1)
    tokenizer = "./data/tokenizers/fineweb_1024_bpe.model"
    hparams = dict(iterations=20000, ngram=True, ngram_max_order=7, run_id=f"syn_seed{seed}", seed=seed,
                   tokenizer_path=tokenizer, train_seq_len=1024, ttt=True, val_max_tokens=0) | (settings or {})
    content = dict(
        source='===== train_gpt.py =====\nlog0(f"final_ngram_ttt_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")',
        hardware=f"Running Python 3.12.3, PyTorch 2.11.0, {H100}",
        run_id=f"run_id:syn_seed{seed}",
        hparams="\n".join(f"hparam {k}:{v}" for k, v in sorted(hparams.items())),
        world="world_size:8 grad_accum_steps:1 device:cuda:0 torch:2.11.0 compile:True",
        code_sha=f"code_sha256:{pkg.repo_code_sha256()}",
        tokenizer=f"tokenizer path:{tokenizer} vocab_size:1024 sha256:{'ab' * 32}",
        val_tokens=f"val_tokens:{VAL_TOKENS} scored_targets:{VAL_TOKENS - 1}",
        model_params="model_params:17059912 ngram_orders:[2, 3, 4, 5, 6, 7]",
        val0="step:0/20000 val_loss:6.9378 val_bpb:4.1090 train_time:0ms step_avg:0.02ms",
        train="step:1400/20000 train_loss:2.0411 train_time:599700ms step_avg:428.36ms",
        val="step:1400/20000 val_loss:2.0500 val_bpb:1.2141 train_time:599700ms step_avg:428.36ms",
        stopped="stopping_early: wallclock_cap train_time:599700ms step:1400/20000",
        sizes="Serialized model int8_zstd: 15500000 bytes\nCode size: 120000 bytes\n"
              "Total submission size int8_zstd: 15620000 bytes",
        roundtrip="final_int8_zstd_roundtrip val_loss:2.0500 val_bpb:1.2141 eval_time:30000ms\n"
                  "final_int8_zstd_roundtrip_exact val_loss:2.05000000 val_bpb:1.21410000",
        audit="legality_audit positions:512 max_abs_sum_err:1.192e-07 max_gold_logp_err:2.384e-07 "
              "max_rescore_logp_delta:0.000e+00 seed:123456789",
        scored=f"scored_tokens:{VAL_TOKENS - 1} scored_bytes:{SCORED_BYTES}",
        eval_time="eval_time roundtrip:30000ms score:60000ms ttt:150000ms total:240000ms",
        final=f"final_ngram_ttt val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} neural_val_loss:2.0400\n"
              f"final_ngram_ttt_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}",
    )
    content.update(lines)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(text for text in content.values() if text is not None) + "\n")
    return dest


# Three seeds 0.0005 BPB apart, far enough below SYNTHETIC_SOTA to be significant.
SYNTHETIC_BPBS = {1337: 1.0800, 42: 1.0805, 2025: 1.0795}
SYNTHETIC_SOTA = 1.0900


def synthetic_seeds(pkg, folder: Path, bpbs=None, **edits) -> list[Path]:
    """One synthetic log per seed, each with the same edits (settings=.. and lines; see synthetic_log)."""
    return [synthetic_log(pkg, folder / f"syn_seed{seed}.txt", seed, bpb, **edits)
            for seed, bpb in (bpbs or SYNTHETIC_BPBS).items()]


def test_synthetic_record_is_accepted_with_its_significance_and_tokenizer(pkg, tmp_path):
    logs = synthetic_seeds(pkg, tmp_path / "logs")
    run = pkg.parse_log(logs[0])
    assert (run.world_size, run.hardware, run.scored_tokens, run.mixer_ran) == (8, H100, VAL_TOKENS - 1, True)
    dest = package(pkg, logs, tmp_path / "out", "--sota-val-bpb", str(SYNTHETIC_SOTA))
    assert dest.parent.name == "track_10min_16mb"
    sub = json.loads((dest / "submission.json").read_text())
    margin = 0.005 * (VAL_TOKENS - 1) / (SCORED_BYTES * math.log(2))
    assert sub["track"] == "track_10min_16mb" and sub["world_size"] == 8 and sub["hardware"] == H100
    assert sub["tokenizer"] == dict(path="./data/tokenizers/fineweb_1024_bpe.model", vocab_size=1024,
                                    sha256="ab" * 32)
    assert (sub["scored_tokens"], sub["scored_bytes"]) == (VAL_TOKENS - 1, SCORED_BYTES)
    significance = sub["significance"]
    assert significance["margin_bpb"] == pytest.approx(margin, rel=1e-12) and significance["margin_nats"] == 0.005
    assert significance["sota_val_bpb"] == SYNTHETIC_SOTA and significance["degrees_of_freedom"] == 2
    assert significance["record"] and significance["p"] < 0.01
    readme = (dest / "README.md").read_text()
    assert f"record (p = {significance['p']:.3g})" in readme and f"= {margin:.5f} BPB on this val set" in readme
    assert f"sha256 `{'ab' * 32}`" in readme
    assert "62,021,845 targets" in readme and "whole 1024-token sequences only (62,021,632 targets)" in readme
    assert "max_rescore_logp_delta:0.000e+00 seed:123456789" in readme


RECORD_RULES = {
    "world_size": (dict(world="world_size:1 grad_accum_steps:8 device:cuda:0 torch:2.11.0 compile:True"),
                   "world_size:1: the record track runs 8 processes"),
    "hardware": (dict(hardware="Running Python 3.12.3, PyTorch 2.11.0, NVIDIA A100-SXM4-80GB"),
                 "hardware 'NVIDIA A100-SXM4-80GB' is not an H100"),
    "hardware line": (dict(hardware=None), "no hardware line"),
    "val_max_tokens": (dict(settings=dict(val_max_tokens=1000000)),
                       "hparam val_max_tokens:1000000: the record track scores the whole val set"),
    "whole val set": (dict(scored=f"scored_tokens:{VAL_TOKENS - 2} scored_bytes:{SCORED_BYTES}"),
                      f"scored_tokens:{VAL_TOKENS - 2} is not every target of the val set"),
    "scored line": (dict(scored=None), "no val_tokens or scored_tokens line"),
    "training time": (dict(train="step:1400/20000 train_loss:2.0411 train_time:600001ms step_avg:428.36ms",
                           val="step:1400/20000 val_loss:2.0500 val_bpb:1.2141 train_time:600001ms step_avg:0.1ms",
                           stopped=None), "training took 600.001 s > 600 s"),
    "evaluation time": (dict(eval_time="eval_time roundtrip:30000ms total:600001ms"), "evaluation took 600.001 s"),
}


@pytest.mark.parametrize("case", RECORD_RULES)
def test_record_track_rules_name_each_log_and_pass_with_non_record(pkg, tmp_path, case):
    # Every seed gets the edit, as a real set of seeds would (a setting edited in one would differ from the others).
    edits, reason = RECORD_RULES[case]
    logs = synthetic_seeds(pkg, tmp_path / "logs", **edits)
    message = refusal(pkg, logs, tmp_path / "out", "--sota-val-bpb", str(SYNTHETIC_SOTA))
    for log in logs:
        assert any(reason in line and str(log) in line for line in message.splitlines()), message
    # The record-only rules are the only refusal: --non-record packages the same logs.
    assert package(pkg, logs, tmp_path / "out", "--non-record").parent.name == "track_non_record_16mb"


def test_record_track_needs_three_distinct_seeds(pkg, tmp_path):
    logs = synthetic_seeds(pkg, tmp_path / "logs", bpbs={1337: 1.0800, 42: 1.0801})
    message = refusal(pkg, logs, tmp_path / "out", "--sota-val-bpb", str(SYNTHETIC_SOTA))
    assert "2 distinct seed(s) [42, 1337]; the record track needs at least 3" in message
    assert str(logs[0]) in message and str(logs[1]) in message
    package(pkg, logs, tmp_path / "out", "--non-record")


def test_record_track_needs_the_sota_score_and_significance(pkg, tmp_path):
    logs = synthetic_seeds(pkg, tmp_path / "logs")
    assert "--sota-val-bpb missing" in refusal(pkg, logs, tmp_path / "a")
    # Mean 1.0800 against 1.0830 - margin 0.00296: t = 0.000039 / (0.0005 / sqrt(3)), far from p < 0.01.
    message = refusal(pkg, logs, tmp_path / "b", "--sota-val-bpb", "1.0830")
    assert "not significant (p = " in message and "a record needs p < 0.01" in message
    dest = package(pkg, logs, tmp_path / "c", "--non-record", "--sota-val-bpb", "1.0830")
    sub = json.loads((dest / "submission.json").read_text())
    assert not sub["significance"]["record"] and sub["significance"]["p"] > 0.01


def test_sota_val_loss_is_rejected_with_a_pointer_to_val_bpb(pkg, tmp_path, capsys):
    logs = synthetic_seeds(pkg, tmp_path / "logs")
    with pytest.raises(SystemExit) as err:
        package(pkg, logs, tmp_path / "out", "--sota-val-loss", "2.80428")
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and not (tmp_path / "out").exists()
    assert "--sota-val-loss was removed" in stderr and "depends on the tokenizer" in stderr
    assert "give the current record's val_bpb with --sota-val-bpb" in stderr


def test_seeds_may_differ_in_their_dump_paths_only(pkg, tmp_path):
    logs = [synthetic_log(pkg, tmp_path / f"s{seed}.txt", seed, bpb, settings=dict(eval_dump=f"dumps/s{seed}.npz"))
            for seed, bpb in SYNTHETIC_BPBS.items()]
    dest = package(pkg, logs, tmp_path / "out", "--sota-val-bpb", str(SYNTHETIC_SOTA))
    assert "EVAL_DUMP" not in (dest / "README.md").read_text()
    logs[2] = synthetic_log(pkg, logs[2], 2025, 1.0795, settings=dict(eval_dump="x.npz", ngram_max_order=6))
    assert "settings differ from" in refusal(pkg, logs, tmp_path / "out2", "--sota-val-bpb", str(SYNTHETIC_SOTA))


def test_audit_thresholds_match_the_trainer(pkg, tmp_path):
    assert Audit(32, 1e-6, 1e-6, 1e-6).failures() == []
    assert Audit(0, 0.0, 0.0, 0.0).failures() == ["positions:0 (no target audited)"]
    assert Audit(32, 1.01e-6, 1.01e-6, 1.01e-6).failures() == [
        "max_abs_sum_err:1.010e-06 > 1e-06", "max_gold_logp_err:1.010e-06 > 1e-06",
        "max_rescore_logp_delta:1.010e-06 > 1e-06"]
    # the trainer's own verdict on the same figures
    assert len(audit_failures((32, 1.01e-6, 1.01e-6, 1.01e-6))) == 3 and audit_failures((32, 1e-6, 1e-6, 1e-6)) == []
    # A nan error compares False with everything: it must fail, not slip through.
    log = synthetic_log(pkg, tmp_path / "nan.txt", 1, 1.08, audit="legality_audit positions:4096 "
                        "max_abs_sum_err:nan max_gold_logp_err:0.000e+00 max_rescore_logp_delta:0.000e+00 seed:1")
    assert pkg.parse_log(log).audit.failures() == ["max_abs_sum_err:nan > 1e-06"]
    assert "legality audit failed: max_abs_sum_err:nan" in refusal(pkg, [log], tmp_path / "out", "--non-record")


# ----- significance in BPB -----

def bpb_runs(pkg, bpbs, scored_tokens, scored_bytes):
    return [RunLog(Path(f"seed{i}.txt"), val_bpb=bpb, scored_tokens=scored_tokens, scored_bytes=scored_bytes)
            for i, bpb in enumerate(bpbs)]


def test_significance_matches_a_hand_computed_t_test(pkg):
    # Worked example: 1,000,000 tokens of 2,500,000 bytes: the 0.005-nat margin is 0.005 x 0.4 / ln 2 =
    # 0.00288539 BPB. val_bpb 1.100, 1.101, 1.102 -> mean 1.101, sample std 0.001, standard error 0.001/sqrt(3).
    # SOTA 1.108: t = (1.108 - 0.00288539 - 1.101) / 0.00057735 = 7.12671. With 2 degrees of freedom the t CDF is
    # F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1/2 - 7.12671 / (2 sqrt(52.7900)) = 0.0095629: a record.
    # SOTA 1.107: t = 5.39466, p = 1/2 - 5.39466 / (2 sqrt(31.1024)) = 0.016343: not significant, though without
    # the margin t would be 10.39 (p = 0.0046).
    assert pkg.margin_bpb(1_000_000, 2_500_000) == pytest.approx(0.002 / math.log(2), rel=1e-12)
    runs = bpb_runs(pkg, [1.100, 1.101, 1.102], 1_000_000, 2_500_000)
    for sota, t_hand, p_hand, verdict in ((1.108, 7.126713, 0.0095629, "record (p = 0.00956)"),
                                          (1.107, 5.394663, 0.016343, "not significant (p = 0.0163)")):
        result = pkg.significance(runs, sota)
        assert result.t == pytest.approx(t_hand, rel=1e-6) and result.degrees_of_freedom == 2
        assert result.p == pytest.approx(0.5 - result.t / (2 * math.sqrt(2 + result.t ** 2)), rel=1e-9)
        assert result.p == pytest.approx(p_hand, abs=5e-7)
        assert pkg.significance_statement(runs, sota).startswith(verdict)
    assert pkg.significance_statement(runs, None).startswith("No comparison made")
    assert "no scored_tokens line" in pkg.significance_statement(bpb_runs(pkg, [1.1, 1.2], None, None), 1.3)


def test_a_weaker_model_on_a_smaller_vocabulary_is_not_a_record(pkg):
    # The old nats-per-token test called sp1024 val_loss 2.0720, 2.0731, 2.0712 a record against an SP8192
    # record's val_loss 2.80428 (p = 2.9e-7). In BPB (this val set: 62,021,845 tokens, 151,080,891 bytes) the
    # sp1024 runs score about 1.227 against the record's 1.0856: nowhere near.
    tokens_per_byte = (VAL_TOKENS - 1) / SCORED_BYTES
    bpbs = [loss * tokens_per_byte / math.log(2) for loss in (2.0720, 2.0731, 2.0712)]
    assert 1.22 < min(bpbs) and max(bpbs) < 1.23
    result = pkg.significance(bpb_runs(pkg, bpbs, VAL_TOKENS - 1, SCORED_BYTES), 1.0856)
    assert not result.record and result.p > 0.99 and result.t < 0


def test_time_limits_and_the_wallclock_cap(pkg, tmp_path):
    # A run the wallclock cap stopped may overshoot 600 s by the step that crossed the cap (step_avg 428.36 ms),
    # not by more.
    for overshoot_ms, accepted in ((200, True), (900, False)):
        train_time = f"{600_000 + overshoot_ms}ms"
        log = synthetic_log(pkg, tmp_path / f"capped{overshoot_ms}.txt", 1, 1.08,
                            train=f"step:1400/20000 train_loss:2.0411 train_time:{train_time} step_avg:428.36ms",
                            val=f"step:1400/20000 val_loss:2.05 val_bpb:1.2141 train_time:{train_time} step_avg:1ms",
                            stopped=f"stopping_early: wallclock_cap train_time:{train_time} step:1400/20000")
        run = pkg.parse_log(log)
        assert run.stopped_early and run.train_time_ms > 600_000 and run.step_avg_ms == 428.36
        assert (pkg.check_runs([run], non_record=False) == []) == accepted
        assert pkg.check_runs([run], non_record=True) == []


# ----- the record folder -----

def test_record_folder_layout_and_submission(pkg, code, record, seed_runs):
    runs = [pkg.parse_log(path) for path, _ in seed_runs.values()]
    assert record.parent.name == "track_non_record_16mb" and record.name == "2026-01-02_Tiny_Mixer"
    assert sorted(p.name for p in record.iterdir()) == sorted(
        ["README.md", "submission.json", "loss.png", "train_gpt.py", "ngram_mixer.py", "requirements.txt"]
        + [f"train_seed{s}.log" for s in SEEDS])
    for seed, (path, _) in seed_runs.items():
        assert (record / f"train_seed{seed}.log").read_bytes() == path.read_bytes()
    # The copied code is the code the logs ran.
    code_bytes = b"".join((record / name).read_bytes() for name in ("train_gpt.py", "ngram_mixer.py"))
    assert hashlib.sha256(code_bytes).hexdigest() == runs[0].code_sha256
    assert (record / "requirements.txt").read_bytes() == (code / "requirements.txt").read_bytes()

    sub = json.loads((record / "submission.json").read_text())
    losses = [log_value(p.read_text(), "final_ngram_ttt_exact", "val_loss") for p, _ in seed_runs.values()]
    bpbs = [log_value(p.read_text(), "final_ngram_ttt_exact", "val_bpb") for p, _ in seed_runs.values()]
    assert sub["val_loss"] == pytest.approx(sum(losses) / 3, abs=1e-8)
    assert sub["val_bpb"] == pytest.approx(sum(bpbs) / 3, abs=1e-8)
    assert sub["bytes_total"] == max(r.bytes_total for r in runs) and sub["bytes_code"] == len(code_bytes)
    assert sub["seeds"] == list(SEEDS)
    assert {k: sub[k] for k in ("author", "github_id", "name", "blurb", "date")} == dict(
        author="Test Er", github_id="tester", name="Tiny Mixer", blurb="Tiny CPU runs.", date="2026-01-02")


def test_record_readme_table_and_significance(pkg, record, seed_runs):
    readme = (record / "README.md").read_text()
    runs = [pkg.parse_log(path) for path, _ in seed_runs.values()]
    for run in runs:
        row = next(line for line in readme.splitlines() if line.startswith(f"| {run.seed} |"))
        assert f"| {run.val_loss:.8f} | {run.val_bpb:.8f} | {run.steps} | {run.step_avg_ms:.2f} ms |" in row
        assert f"| {run.bytes_total:,} |" in row
    bpbs = [r.val_bpb for r in runs]
    mean = sum(bpbs) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in bpbs) / 2)
    assert f"| mean ± std | {sum(r.val_loss for r in runs) / 3:.5f} ± " in readme
    assert f"val_bpb **{mean:.5f} ± {std:.5f}**" in readme
    # Three seeds: 2 degrees of freedom, so the closed-form t CDF gives the p-value to expect.
    margin = 0.005 * runs[0].scored_tokens / (runs[0].scored_bytes * math.log(2))
    t = (SOTA_BPB - margin - mean) / (std / math.sqrt(3))
    p = 0.5 - t / (2 * math.sqrt(2 + t * t))
    assert f"{'record' if p < 0.01 else 'not significant'} (p = {p:.3g})" in readme
    assert f"{runs[0].scored_tokens:,} targets" in readme and "Tokenizer: `" in readme


def test_record_readme_command_uses_real_env_vars(record):
    readme = (record / "README.md").read_text()
    source = (record / "train_gpt.py").read_text()
    names = re.findall(r"^  ([A-Z0-9_]+)=", readme, re.M)
    assert len(names) > 20 and "NGRAM" in names and "ITERATIONS" in names
    assert [n for n in names if f'os.environ.get("{n}"' not in source] == []


def test_loss_png_is_a_png(record):
    data = (record / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 300


def test_record_folder_runs_from_inside_itself(pkg, record, seed_runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(record, copy)
    proc, log = run_trainer(copy, script=copy / "train_gpt.py", RUN_ID="inside", SEED=1, **MIXER_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run, seed1 = pkg.parse_log(copy / "logs" / "inside.txt"), pkg.parse_log(record / "train_seed1.log")
    assert run.val_loss == log_value(log, "final_ngram_ttt_exact", "val_loss")
    assert run.code_sha256 == seed1.code_sha256
    # Same code, settings and seed on one CPU thread: the folder reproduces its seed-1 score.
    assert (run.val_loss, run.val_bpb) == (seed1.val_loss, seed1.val_bpb)


# ----- run.sh -----

def test_run_sh_runs_seeds_and_packages(pkg, code, tmp_path):
    env = trainer_env(NPROC=1, SEEDS="1 2", RUN_NAME="rs", RECORD_NAME="RunSh", AUTHOR="tester", GITHUB_ID="gh",
                      PACKAGE_ARGS=f"--non-record --out-root {tmp_path / 'records'} --date 2026-01-03", **MIXER_RUN)
    proc = subprocess.run(["bash", str(code / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    dest = tmp_path / "records" / "track_non_record_16mb" / "2026-01-03_RunSh"
    assert f"wrote {dest}" in proc.stdout
    for seed in (1, 2):
        log = tmp_path / "logs" / f"rs_seed{seed}.txt"
        assert (dest / f"train_seed{seed}.log").read_bytes() == log.read_bytes()
        run = pkg.parse_log(log)
        assert run.seed == seed and run.world_size == 1 and run.val_loss is not None
    sub = json.loads((dest / "submission.json").read_text())
    assert sub["seeds"] == [1, 2] and sub["author"] == "tester" and sub["github_id"] == "gh"


def test_run_sh_stops_at_the_first_failed_seed(code, tmp_path):
    # Seed 1's log already exists, so the trainer refuses to start it; seed 2 must then never run.
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rf_seed1.txt").write_text("an earlier run\n")
    env = trainer_env(NPROC=1, SEEDS="1 2", RUN_NAME="rf", RECORD_NAME="Fail", AUTHOR="tester",
                      PACKAGE_ARGS=f"--out-root {tmp_path / 'records'}", **MIXER_RUN)
    proc = subprocess.run(["bash", str(code / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert f"seed 1 failed with exit code {proc.returncode}" in proc.stderr
    assert not (tmp_path / "logs" / "rf_seed2.txt").exists() and not (tmp_path / "records").exists()


def test_run_sh_needs_a_record_name_before_training(code, tmp_path):
    env = trainer_env(NPROC=1, SEEDS="1", AUTHOR="tester")
    env.pop("RECORD_NAME", None)
    proc = subprocess.run(["bash", str(code / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "RECORD_NAME" in proc.stderr and not (tmp_path / "logs").exists()
