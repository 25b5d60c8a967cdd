"""Lightning loop-state surgery on a checkpoint dict, so a resumed run continues exactly where an uninterrupted one
would be: the logger step after a resume, a checkpoint written between two batches, one written at an epoch end.
"""

from __future__ import annotations

from typing import Any

#: marker of the resumable training loader's state (``meddiff.data.resumable``): its position is set to the batches
#: completed when a checkpoint is written at a batch boundary
LOADER_STATE_MARKER = "meddiff_resumable_loader"


def logging_step_after_resume(ckpt: dict[str, Any]) -> int:
    """The logger step at which a run resumed from ``ckpt`` logs next; CSV rows at or after it are redone.

    Lightning restores ``_batches_that_stepped`` and adds one when the checkpoint was written in
    ``on_train_batch_end`` (batch processed but not yet counted as completed).
    """
    fit = ckpt.get("loops", {}).get("fit_loop", {})
    step = int(fit.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", ckpt.get("global_step", 0)))
    total = fit.get("epoch_loop.batch_progress", {}).get("total", {})
    if total and total.get("started") == total.get("ready") and total.get("processed") == total.get("started") \
            and total.get("completed") == total.get("processed", 0) - 1:
        step += 1
    return step



def normalise_batch_boundary(checkpoint: dict[str, Any]) -> None:
    """Mark a checkpoint written between two batches as "all fetched batches completed".

    Written at the start of batch k+1 (or when batch k+1 failed before its optimizer step), Lightning's progress says
    batch k+1 is ready but not completed; restored as is, Lightning would shift its logging step by one. The weights,
    optimizer and EMA are exactly those after batch k, so the progress is set to that: ready = started = processed =
    completed, and a resumable loader's position to the completed batches.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    progress = fit.get("epoch_loop.batch_progress")
    if not progress:
        return
    for part in ("total", "current"):
        counts = progress.get(part)
        if counts:
            for key in ("ready", "started", "processed"):
                counts[key] = counts["completed"]
    progress["is_last_batch"] = False
    done = progress.get("current", {}).get("completed")
    for state in fit.get("state_dict", {}).get("combined_loader", []) or []:
        if isinstance(state, dict) and state.get(LOADER_STATE_MARKER) and done is not None:
            state["batches_done"] = int(done)


def mark_finished_epoch_completed(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written at the end of an epoch resume at the start of the next one, exactly once.

    Written in ``on_train_epoch_end`` / after validation, the progress says the epoch was processed but not yet
    completed (Lightning increments ``completed`` after the epoch-end hooks) and the epoch's batch counters are full.
    Without ``max_steps`` Lightning 2.6 handles that itself; with ``max_steps`` set (iteration-based training, e.g.
    the demo's fixed budget) it treats the resume as a restart inside the finished epoch: the epoch loop sees its
    batch budget used up, runs no batch, the epoch is counted processed a second time, and a resume that raised
    ``max_epochs`` by one stops at once ("max_epochs reached") having trained nothing. Here the state is put where
    Lightning's own epoch boundary puts it: the epoch completed, the per-epoch batch/step counters (``current``) at
    zero, the per-epoch validation count reset; totals (global step, logging step) are untouched. Checkpoints written
    mid-epoch or at a batch end are left alone. Returns whether the checkpoint was changed.

    A resumable training loader's position moves to the start of the next epoch as well: under
    ``trainer.limit_train_batches`` the finished epoch stopped short of the loader's full length, and restored as is
    the loader would continue that epoch's order for its remaining batches (the resumed epoch too short and in the
    wrong order) while Lightning starts the next epoch.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = fit.get("epoch_progress")
    batches = fit.get("epoch_loop.batch_progress") or {}
    if not epochs or not batches.get("is_last_batch"):
        return False
    if not all(c["ready"] == c["started"] == c["processed"] == c["completed"] + 1 for c in epochs.values()):
        return False
    for c in epochs.values():
        c["completed"] = c["processed"]
    batches["is_last_batch"] = False
    for key in ("epoch_loop.batch_progress", "epoch_loop.scheduler_progress"):
        progress = fit.get(key) or {}
        for name in progress.get("current", {}):
            progress["current"][name] = 0
    optim = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    for progress in optim.values():
        for name in progress.get("current", {}):
            progress["current"][name] = 0
    val = fit.get("epoch_loop.val_loop.batch_progress") or {}
    for name in val.get("total", {}):
        val["total"][name] = 0
    for state in fit.get("state_dict", {}).get("combined_loader", []) or []:
        if isinstance(state, dict) and state.get(LOADER_STATE_MARKER):
            state["epoch"], state["batches_done"] = int(state["epoch"]) + 1, 0
    return True
