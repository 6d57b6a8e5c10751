"""When the mixer trains: NGRAM_TRAIN_START (the lookups and the mixture loss from a fraction of the run on)
and NGRAM_GATE_FIT_SECONDS (the gate alone, after training, on the exported weights)."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TINY_ENV, log_value, run_trainer


def tiny_trainer(monkeypatch, **settings):
    for name, value in dict(TINY_ENV, NGRAM="1", NGRAM_MAX_ORDER="3", **settings).items():
        monkeypatch.setenv(name, value)
    args = tg.Hyperparameters()
    tg.validate_hyperparameters(args, 1)
    run = SimpleNamespace(args=args, device=torch.device("cpu"), rank=0, world_size=1, distributed=False,
                          compile_model=False, bos_id=1, autocast=contextlib.nullcontext, sync=lambda: None,
                          log=lambda msg: None)
    return run, tg.build_trainer(run, tg.list_shards(args.data_path, "train"))


def test_before_the_start_no_lookup_and_no_gate_gradient(monkeypatch):
    """Before NGRAM_TRAIN_START the step makes no lookup and its loss is the CE alone (the gate's gradient is zero
    but present, so DDP sees every parameter); from the start on the gate learns the mixture NLL."""
    run, trainer = tiny_trainer(monkeypatch)
    gate = trainer.base_model.gate_parameters()
    lookups = []
    honest = tg.training_expert_inputs
    monkeypatch.setattr(tg, "training_expert_inputs", lambda *a, **k: lookups.append(1) or honest(*a, **k))
    trainer.mixing = False
    loss, ce, _ = tg.train_step(run, trainer).tolist()
    assert lookups == [] and loss == pytest.approx(ce, rel=1e-6)
    assert all(p.grad is not None and not p.grad.any() for p in gate)
    tg.optimizer_step(run.args, trainer, 0, 1.0)
    trainer.mixing = True
    tg.train_step(run, trainer)  # the batch prefetched while mixing was off: still no experts
    tg.optimizer_step(run.args, trainer, 1, 1.0)
    assert lookups == [1]  # the lookup for the next step, made at the end of this one
    loss, ce, mix_nll = tg.train_step(run, trainer).tolist()
    assert loss == pytest.approx(ce + run.args.ngram_loss_weight * mix_nll, rel=1e-5) and mix_nll < ce
    assert any(p.grad.any() for p in gate)


def test_gate_fit_moves_the_gate_alone_on_the_exported_weights(monkeypatch):
    run, trainer = tiny_trainer(monkeypatch, EMA_DECAY="0.5")
    model = trainer.base_model
    for _ in range(2):
        tg.train_step(run, trainer)
        tg.optimizer_step(run.args, trainer, 0, 1.0)
        trainer.ema.update(model)
    exported = trainer.ema.state_dict(model)
    gate_names = {name for name, p in model.named_parameters() if any(p is g for g in model.gate_parameters())}
    tg.fit_gate(run, trainer, seconds=1.0)
    assert trainer.ema is None  # the model holds the exported weights now
    after = model.state_dict()
    for name, value in exported.items():
        if name in gate_names:
            assert not torch.equal(after[name], value), name
        else:
            assert torch.equal(after[name], value), name


def test_modes_run_end_to_end_and_the_audit_passes(tmp_path):
    """A run that starts the mixture half-way and fits the gate for 2 s completes; the fit's time is taken from
    the wallclock cap, the audit and the causality proof pass."""
    proc, log = run_trainer(tmp_path, RUN_ID="modes", NGRAM="1", TTT="0", ITERATIONS="1000",
                            MAX_WALLCLOCK_SECONDS="8", NGRAM_TRAIN_START="0.5", NGRAM_GATE_FIT_SECONDS="2",
                            EVAL_DUMP=str(tmp_path / "modes.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert log_value(log, "gate_fit", "steps") >= 1
    assert log_value(log, "stopping_early", "train_time") < 8000  # the loop stops at 8 s - 2 s of fit
    # exit 0: the audit passed (it exits 4 otherwise)
    assert "identical:True" in [ln for ln in log.splitlines() if ln.startswith("causality_proof")][-1]
    dump = np.load(tmp_path / "modes.npz")
    assert list(dump["expert_names"]) == ["neural", *(f"order{n}" for n in range(2, 8)), "document"]


@pytest.mark.parametrize("settings, message", [
    (dict(NGRAM_TRAIN_START="1.5"), "NGRAM_TRAIN_START=1.5"),
    (dict(NGRAM_GATE_FIT_SECONDS="10", MAX_WALLCLOCK_SECONDS="5"), "NGRAM_GATE_FIT_SECONDS=10.0"),
])
def test_bad_mode_settings_are_refused(monkeypatch, settings, message):
    with pytest.raises(ValueError, match=message):
        tiny_trainer(monkeypatch, **settings)
