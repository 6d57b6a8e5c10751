"""records/prove_causality.py and the evaluation's inline causality proof on a real tiny artifact: an honest
evaluation keeps every loss up to K bit-identical when the val tokens after K are replaced; a TTT that trains on
the next chunk through a shifted view of the stream (so the indices it records look in range) is caught by both.

Run:  python -m pytest -q tests/test_causality_proof.py
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, TINY_ENV, run_trainer

sys.path.insert(0, str(REPO_ROOT / "records"))
import prove_causality  # noqa: E402

# TTT trains on chunk [end, end + n) while told [first, end): every index it records stays below `end`.
LEAKY_TTT = f'''
import sys
sys.path.insert(0, {str(REPO_ROOT)!r})
import ngram_mixer
import train_gpt as tg

honest = ngram_mixer.ttt_on_chunk


def one_chunk_ahead(setup, optimizer, params, first, end, *rest):
    tokens, n = setup.tokens, end - first
    setup.tokens = tokens[n:]
    try:
        honest(setup, optimizer, params, first, min(end, len(tokens) - n), *rest)
    finally:
        setup.tokens = tokens


ngram_mixer.ttt_on_chunk = one_chunk_ahead
if "--dodge-inline-proof" in sys.argv:
    ngram_mixer.proof_target = lambda bounds, generator: 5  # the inline proof then compares the first chunk only
tg.main()
'''


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proof")
    proc, _ = run_trainer(workdir, RUN_ID="proof")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir / "final_model.proof.ptz"


@pytest.fixture
def tiny_env(monkeypatch, artifact):
    for name, value in dict(TINY_ENV, OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(artifact.parent)


def test_honest_evaluation_is_proved_causal(tiny_env, artifact, capsys):
    # K = 1500: mid second chunk (EVAL_CHUNK_TOKENS=1024), after a TTT step and a gate step
    assert prove_causality.main([str(artifact), "--after", "1500", "--out", "honest"]) == 0
    proof = json.loads(Path("honest/causality_proof.json").read_text())
    assert proof["passed"] and proof["first_difference"] is None and proof["targets_moved_after"] > 1000
    assert "causality_proof after:1500 targets:1500 identical:True" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists"):
        prove_causality.main([str(artifact), "--out", "honest"])


def test_ttt_leak_that_records_honest_indices_is_caught(tiny_env, artifact, tmp_path):
    leaky = tmp_path / "leaky_train_gpt.py"
    leaky.write_text(LEAKY_TTT)
    # the evaluation's own inline proof stops the run
    proc, log = run_trainer(artifact.parent, script=leaky, RUN_ID="leaky", EVAL_ARTIFACT=str(artifact))
    assert proc.returncode == 4 and "LEGALITY_AUDIT_FAILED: target" in log and "later tokens" in log, log[-2000:]
    # the reviewer's tool on a leaky trainer that also dodges the inline proof: the first target that moved
    dodging = tmp_path / "dodging_train_gpt.py"
    dodging.write_text(LEAKY_TTT.replace('"--dodge-inline-proof" in sys.argv', "True"))
    assert prove_causality.main([str(artifact), "--after", "1025", "--trainer", str(dodging), "--out", "leaky"]) == 1
    proof = json.loads(Path("leaky/causality_proof.json").read_text())
    assert not proof["passed"] and proof["first_difference"]["target"] <= 1025


def test_replaced_stream_is_logged_and_validated(tiny_env, artifact):
    proc, log = run_trainer(artifact.parent, RUN_ID="replaced", EVAL_ARTIFACT=str(artifact), VAL_REPLACE_AFTER="2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_replaced_after:2000" in log
    proc, _ = run_trainer(artifact.parent, RUN_ID="replaced_bad", EVAL_ARTIFACT=str(artifact),
                          VAL_REPLACE_AFTER="4095")
    assert proc.returncode != 0 and "VAL_REPLACE_AFTER" in proc.stderr
    assert os.path.exists(artifact)


def test_ttt_without_the_mixer_is_proved_too(tmp_path):
    """NGRAM=0 TTT=1: the final pass keeps no mixing weights, and its proof compares the losses alone."""
    proc, log = run_trainer(tmp_path, RUN_ID="ttt_only", NGRAM="0", ITERATIONS="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical:True" in next(ln for ln in log.splitlines() if ln.startswith("causality_proof"))


def test_a_tiny_eval_time_budget_stops_learning_but_scores_every_target(tmp_path):
    """EVAL_TIME_BUDGET: past the projection, TTT and then the gate stop (never before the proof's K), every
    target is still scored once, the audit and the proof pass, and the dump covers every target."""
    proc, log = run_trainer(tmp_path, RUN_ID="budget", ITERATIONS="2", VAL_MAX_TOKENS="8192",
                            EVAL_TIME_BUDGET="0.01", EVAL_DUMP="budget.npz")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = log.splitlines()
    stopped = [ln for ln in lines if ln.startswith("eval_budget ")]
    assert [ln.split()[2] for ln in stopped] == ["stopped:ttt", "stopped:gate"], stopped
    after = int(next(ln for ln in lines if ln.startswith("causality_proof")).split()[1].split(":")[1])
    first_stop = int(stopped[0].split()[1].split(":")[1].split("/")[0])
    assert first_stop * 1024 + 1 > after  # the chunk it stopped after ends past K (EVAL_CHUNK_TOKENS=1024)
    assert any(ln.startswith("eval_progress chunks:8/8 targets:8191 ") for ln in lines)
    assert "scored_tokens:8191 " in log and "identical:True" in log
    assert not any(ln.startswith("LEGALITY_AUDIT_FAILED") for ln in lines)
    dump = np.load(tmp_path / "budget.npz")
    assert len(dump["nll"]) == 8191 and bool((dump["nll"] > 0).all())
    assert any(ln.startswith("eval_wallclock:") for ln in lines)
