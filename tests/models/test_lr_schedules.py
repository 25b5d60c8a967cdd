"""WarmupCosineLR: the demo's warm-up + cosine schedule as a class a stored config may build (issue 20); its math,
and a state_dict that survives a weights-only checkpoint and restores the schedule's position."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import pytest
import torch

from meddiff.models.lr_schedules import WarmupCosineLR, warmup_cosine_factor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "demo_tiny_v0.1.ckpt"


def _scheduler(lr: float = 2e-3, **kwargs) -> WarmupCosineLR:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return WarmupCosineLR(opt, **kwargs)


def _lrs(sched: WarmupCosineLR, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_warm_up_then_cosine_to_min_factor():
    w, total, floor = 100, 1650, 0.05
    assert warmup_cosine_factor(0, w, total, floor) == pytest.approx(1 / w)
    assert warmup_cosine_factor(49, w, total, floor) == pytest.approx(0.5)
    assert warmup_cosine_factor(w, w, total, floor) == pytest.approx(1.0)  # the peak right after the warm-up
    mid = w + (total - w) // 2
    assert warmup_cosine_factor(mid, w, total, floor) == pytest.approx(floor + (1 - floor) * 0.5, abs=2e-3)
    assert warmup_cosine_factor(total, w, total, floor) == pytest.approx(floor)
    assert warmup_cosine_factor(10 * total, w, total, floor) == pytest.approx(floor)  # held after the end
    assert warmup_cosine_factor(0, 0, 10, 0.2) == pytest.approx(1.0)  # no warm-up


def test_the_scheduler_follows_the_factor_from_the_base_lr():
    sched = _scheduler(lr=2e-3, warmup_steps=100, total_steps=1650)
    lrs = _lrs(sched, 1700)
    for step in (0, 1, 50, 99, 100, 101, 500, 1649, 1650, 1699):
        want = 2e-3 * (min(1.0, (step + 1) / 100) if step < 100 else
                       0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 100) / 1550))))
        assert lrs[step] == pytest.approx(want, rel=1e-12), step
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)


def test_state_dict_round_trip_through_a_weights_only_checkpoint_restores_the_position():
    a = _scheduler(warmup_steps=10, total_steps=100)
    _lrs(a, 37)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain numbers only
    assert state["last_epoch"] == 37 and state["lr_lambdas"] == [None]
    b = _scheduler(warmup_steps=10, total_steps=100)  # as a resume builds it from the run's config
    b.load_state_dict(state)
    assert _lrs(b, 80) == _lrs(a, 80)


def test_a_resume_with_other_settings_uses_the_configured_ones(caplog):
    a = _scheduler(warmup_steps=10, total_steps=100)
    _lrs(a, 50)
    b = _scheduler(warmup_steps=10, total_steps=400)  # resume=<run> model.lr_scheduler.total_steps=400
    with caplog.at_level(logging.WARNING, logger="meddiff.models.lr_schedules"):
        b.load_state_dict(a.state_dict())
    assert "total_steps 100 -> 400" in caplog.text
    assert b.total_steps == 400 and b.last_epoch == 50
    want = 2e-3 * warmup_cosine_factor(50, 10, 400, 0.05)  # from the restored step on, not one step later
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(want) and _lrs(b, 1)[0] == pytest.approx(want)
    assert _lrs(b, 1)[0] == pytest.approx(2e-3 * warmup_cosine_factor(51, 10, 400, 0.05))


def test_the_v0_1_demo_checkpoints_schedule_state_loads():
    from meddiff.runs.checkpoint_io import load_checkpoint

    state = load_checkpoint(FIXTURE)["lr_schedulers"][0]  # written by the former LambdaLR-returning function
    sched = _scheduler(warmup_steps=100, total_steps=1100)
    sched.load_state_dict(state)
    assert sched.last_epoch == 2
    assert _lrs(sched, 1)[0] == pytest.approx(2e-3 * 3 / 100)
