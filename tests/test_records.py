"""Tests of run.sh and records/package.py on logs from real tiny trainer runs: parsing, refusals, the record folder,
the significance test, and the seeds loop.

Run:  python -m pytest -q tests/test_records.py      (about a minute on 2 CPU cores: seven tiny trainer runs)
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

SEEDS = (1, 2, 3)
# VAL_LOSS_EVERY=2 gives loss.png three val points per seed (steps 0, 2, 4).
MIXER_RUN = dict(NGRAM=1, TTT=1, VAL_LOSS_EVERY=2)
SOTA = 9.0
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
                     "--github-id", "tester", "--blurb", "Tiny CPU runs.", "--date", "2026-01-02",
                     "--sota-val-loss", str(SOTA), "--out-root", str(out_root)])


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
        assert run.eval_time_ms == log_value(log, "eval_time", "total")
        assert run.code_sha256 == next(ln for ln in log.splitlines() if ln.startswith("code_sha256:")).split(":")[1]
        total_line = next(ln for ln in log.splitlines() if ln.startswith("Total submission size"))
        assert (run.quant, run.bytes_total) == ("int8_zstd", int(total_line.split()[-2]))
        code_line = next(ln for ln in log.splitlines() if ln.startswith("Code size:"))
        assert run.bytes_code == int(code_line.split()[-2])
        assert run.audit == (int(log_value(log, "legality_audit", "positions")),
                             log_value(log, "legality_audit", "max_abs_sum_err"),
                             log_value(log, "legality_audit", "max_gold_err"))
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


def test_parse_plain_run_scores_the_roundtrip(pkg, plain_run, tmp_path):
    log = plain_run.read_text()
    run = pkg.parse_log(plain_run)
    assert run.final_line == "final_int8_zstd_roundtrip_exact" and not run.mixer_ran and run.audit is None
    assert run.val_loss == log_value(log, "final_int8_zstd_roundtrip_exact", "val_loss")
    assert run.eval_time_ms == log_value(log, "final_int8_zstd_roundtrip ", "eval_time")
    # No mixer: no legality audit to require. One seed: no std and no t-test.
    dest = package(pkg, [plain_run], tmp_path, "--sota-val-loss", "9")
    assert "a t-test needs at least 2 seeds" in (dest / "README.md").read_text()
    assert json.loads((dest / "submission.json").read_text())["seeds"] == [7]


# ----- significance -----

def test_significance_matches_a_hand_computed_t_test(pkg):
    # Worked example: losses 2.00, 2.01, 2.02 -> mean 2.01, sample std 0.01, n = 3, standard error 0.01/sqrt(3).
    # SOTA 2.050: t = (2.050 - 0.005 - 2.010) / (0.01 / sqrt(3)) = 3.5 sqrt(3) = 6.0622.
    # With 2 degrees of freedom the t CDF is F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so
    # p = P(T > t) = 1/2 - 6.0622 / (2 sqrt(38.75)) = 0.013074: not significant at 0.01.
    # SOTA 2.060: t = 4.5 sqrt(3) = 7.7942, p = 1/2 - 7.7942 / (2 sqrt(62.75)) = 0.0080327: a record.
    losses = [2.00, 2.01, 2.02]
    for sota, t_hand, p_hand, verdict in ((2.050, 3.5 * math.sqrt(3), 0.013074, "not significant (p = 0.0131)"),
                                          (2.060, 4.5 * math.sqrt(3), 0.0080327, "record (p = 0.00803)")):
        t, p = pkg.significance(losses, sota)
        assert t == pytest.approx(t_hand, rel=1e-9)
        assert p == pytest.approx(0.5 - t_hand / (2 * math.sqrt(2 + t_hand ** 2)), rel=1e-9)
        assert p == pytest.approx(p_hand, abs=5e-7)
        assert pkg.significance_statement(losses, sota).startswith(verdict)
    # A mean above the threshold gives t < 0 and p > 1/2.
    t, p = pkg.significance(losses, 2.01)
    assert t < 0 and p > 0.5
    assert pkg.significance_statement(losses, None).startswith("No comparison made")


# ----- refusals -----

REFUSALS = {
    "missing final exact line": (("final_ngram_ttt_exact", lambda line: None), "no final exact line"),
    "artifact total over the cap": (("Total submission size", lambda line: re.sub(r"\d+ bytes$", "16000001 bytes",
                                                                                    line)), "exceeds the cap"),
    "ARTIFACT_OVER_CAP line": ((None, lambda _: "ARTIFACT_OVER_CAP total:16000001 cap:16000000"),
                               "ARTIFACT_OVER_CAP"),
    "training over 600 s": ((LAST_VAL, set_field("train_time", "600001ms")), "training took 600.001 s"),
    "evaluation over 600 s": (("eval_time ", set_field("total", "600001ms")), "evaluation took 600.001 s"),
    "legality audit missing": (("legality_audit", lambda line: None), "no legality_audit line"),
    "legality audit error": (("legality_audit", set_field("max_gold_err", "2.000e-04")), "legality audit failed"),
    "LEGALITY_AUDIT_FAILED line": ((None, lambda _: "LEGALITY_AUDIT_FAILED: a scored distribution does not sum to 1"),
                                   "LEGALITY_AUDIT_FAILED"),
    "different code": (("code_sha256:", lambda line: "code_sha256:" + "0" * 64), "seeds ran different code"),
    "different settings": (("hparam iterations:", lambda line: "hparam iterations:5"), "settings differ"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_log_and_the_reason(pkg, seed_runs, tmp_path, case):
    edit, reason = REFUSALS[case]
    logs = [path for path, _ in seed_runs.values()]
    logs[1] = edited_copy(logs[1], tmp_path / "edited" / logs[1].name, edit)
    message = refusal(pkg, logs, tmp_path / "out")
    assert reason in message
    assert any(reason in line and str(logs[1]) in line for line in message.splitlines()), message


def test_unedited_logs_are_accepted(pkg, seed_runs, tmp_path):
    # The control for the refusals: the same logs without the edit make a record.
    dest = package(pkg, [path for path, _ in seed_runs.values()], tmp_path)
    assert (dest / "submission.json").is_file()


def test_time_limits_and_the_wallclock_cap(pkg, seed_runs, tmp_path):
    path = seed_runs[1][0]
    step_ms = pkg.parse_log(path).step_avg_ms
    slow = edited_copy(path, tmp_path / "slow.txt", (LAST_VAL, set_field("train_time", "600050ms")))
    assert "training took 600.050 s" in refusal(pkg, [slow], tmp_path / "a")
    # --non-record files it under the other track and does not enforce the time limits.
    dest = package(pkg, [slow], tmp_path / "b", "--non-record")
    assert dest.parent.name == "track_non_record_16mb"
    # A run the wallclock cap stopped may overshoot 600 s by the step that crossed the cap, not by more.
    for overshoot_ms, accepted in ((step_ms / 2, True), (step_ms * 2, False)):
        train_time = f"{600_000 + overshoot_ms:.0f}ms"
        capped = edited_copy(path, tmp_path / "capped.txt", (LAST_VAL, set_field("train_time", train_time)))
        capped = edited_copy(capped, capped, (None, lambda _: f"stopping_early: wallclock_cap train_time:{train_time} "
                                                              "step:4/20000"))
        run = pkg.parse_log(capped)
        assert run.stopped_early and run.train_time_ms > 600_000
        assert (pkg.check_runs([run], non_record=False) == []) == accepted


def test_refuses_duplicate_seeds_and_an_existing_folder(pkg, seed_runs, tmp_path):
    path = seed_runs[1][0]
    assert "seed 1 appears twice" in refusal(pkg, [path, path], tmp_path / "dup")
    dest = package(pkg, [path], tmp_path)
    readme = (dest / "README.md").read_bytes()
    with pytest.raises(SystemExit) as err:
        package(pkg, [seed_runs[2][0]], tmp_path)
    assert "already exists" in str(err.value.code) and str(dest) in str(err.value.code)
    assert (dest / "README.md").read_bytes() == readme
    assert json.loads((dest / "submission.json").read_text())["seeds"] == [1]


def test_cli_exits_nonzero_naming_the_log(code, seed_runs, tmp_path):
    bad = edited_copy(seed_runs[1][0], tmp_path / "bad.txt", ("final_ngram_ttt_exact", lambda line: None))
    proc = subprocess.run([sys.executable, str(code / "records" / "package.py"), str(bad), "--name", "X",
                           "--author", "a", "--out-root", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode != 0 and f"{bad}: no final exact line" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


# ----- the record folder -----

def test_record_folder_layout_and_submission(pkg, code, record, seed_runs):
    runs = [pkg.parse_log(path) for path, _ in seed_runs.values()]
    assert record.parent.name == "track_10min_16mb" and record.name == "2026-01-02_Tiny_Mixer"
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
    losses = [r.val_loss for r in runs]
    mean = sum(losses) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / 2)
    assert f"| mean ± std | {mean:.5f} ± {std:.5f} |" in readme
    # Three seeds: 2 degrees of freedom, so the closed-form t CDF gives the p-value to expect.
    t = (SOTA - 0.005 - mean) / (std / math.sqrt(3))
    p = 0.5 - t / (2 * math.sqrt(2 + t * t))
    assert f"{'record' if p < 0.01 else 'not significant'} (p = {p:.3g})" in readme


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
                      PACKAGE_ARGS=f"--out-root {tmp_path / 'records'} --date 2026-01-03", **MIXER_RUN)
    proc = subprocess.run(["bash", str(code / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    dest = tmp_path / "records" / "track_10min_16mb" / "2026-01-03_RunSh"
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
