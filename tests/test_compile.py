"""The compiled path on CPU (COMPILE=1, inductor): the default stack at a tiny shape trains across the recurrence
switch and evaluates (sliding windows with a shorter last batch, the audit's re-runs, the causality proof, TTT)
with no graph break and a bounded number of recompiles: one per function at the recurrence switch, one when a
span's last, shorter batch arrives (the graph then turns dynamic in the batch size, so no later chunk, audit
re-run or proof batch recompiles), and one when TTT turns gradients on. Compiled and eager runs agree.

Run:  python -m pytest -q tests/test_compile.py      (about 4 minutes on 2 cores: inductor compiles C++)
"""
import json

import pytest
from conftest import REPO_ROOT, log_value, run_trainer

# The mixer, the document cache, the online gate and TTT (defaults); looping from step 2 of 4; a periodic val.
SETTINGS = dict(ITERATIONS="4", VAL_LOSS_EVERY="2", AUDIT_SEED="5")
# The recompiles a run may need, by what triggers them: the recurrence switch, the first shorter eval batch, TTT.
EXPECTED = ("len(self.execution_order)", "size mismatch at index 0", "grad_mode")


def test_compiled_run_has_no_graph_break_and_bounded_recompiles(tmp_path):
    proc, log = run_trainer(tmp_path, script=REPO_ROOT / "tests" / "compile_counters.py", RUN_ID="compiled",
                            COMPILE="1", **SETTINGS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compile:True" in log
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("compile_counters "))
    counters = json.loads(line.split(" ", 1)[1])
    assert counters["graph_breaks"] == {}
    reasons = counters["recompiles"]
    # forward and hidden at the recurrence switch, the first shorter batch, TTT's gradients: never per chunk
    assert len(reasons) <= 4, reasons
    assert sum("size mismatch" in reason for reason in reasons) <= 1, reasons
    assert all(any(why in reason for why in EXPECTED) for reason in reasons), reasons
    eager, log_eager = run_trainer(tmp_path, RUN_ID="eager", COMPILE="0", **SETTINGS)
    assert eager.returncode == 0, eager.stderr[-3000:]
    for prefix in ("final_int8_zstd_roundtrip_exact", "final_ngram_ttt_exact"):
        assert log_value(log, prefix, "val_loss") == pytest.approx(log_value(log_eager, prefix, "val_loss"),
                                                                   abs=1e-6)
