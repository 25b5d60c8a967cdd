"""The denoise protocol on the shared skeleton (:class:`meddiff.protocols.base.Protocol`): options -> check the
interfaces (:mod:`.interfaces`) -> select on validation (:mod:`.select`) -> the test pass once (:mod:`.test`) ->
the report (:mod:`.report`); the skeleton runs these inside ``evaluating()`` and writes ``report.json`` and
``metrics.csv``; :meth:`DenoiseProtocol.write` adds tables, figures and images (:mod:`.outputs`) and the console
tables (:mod:`.console`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meddiff.protocols.base import Outcome, Protocol, ValidationView
from meddiff.protocols.denoise.console import print_report
from meddiff.protocols.denoise.interfaces import DenoiseData, check_data, check_model
from meddiff.protocols.denoise.options import DenoiseEvalOptions
from meddiff.protocols.denoise.outputs import (
    write_figures,
    write_images,
    write_results_table,
    write_speed_table,
)
from meddiff.protocols.denoise.report import build_report
from meddiff.protocols.denoise.select import DenoiseSelection, select_on_validation
from meddiff.protocols.denoise.test import run_test_pass


class DenoiseProtocol(Protocol):
    """Conditional denoising against the noisy input, NLM, BM3D and a supervised U-Net (see the package)."""

    name = "denoise"
    options = DenoiseEvalOptions

    def __init__(self) -> None:
        #: where the supervised baseline is cached unless ``eval.supervised.cache_dir`` says otherwise
        self.baseline_dir = Path("baselines")

    def check(self, model: Any, datamodule: Any, opts: DenoiseEvalOptions) -> None:
        """ConfigError when the model cannot ``denoise`` or the datamodule lacks :class:`DenoiseData`."""
        check_model(model)
        check_data(datamodule)

    def run(self, model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
            device: str | torch.device | None = None) -> dict[str, Any]:
        """The skeleton's run; the supervised baseline is cached in ``<out_dir>/baselines`` (unless
        ``eval.supervised.cache_dir`` says otherwise)."""
        self.baseline_dir = Path(out_dir) / "baselines"
        return super().run(model, datamodule, eval_cfg, out_dir, device)

    def select(self, model: Any, data: ValidationView, opts: DenoiseEvalOptions, device: torch.device
               ) -> DenoiseSelection:
        return select_on_validation(model, data, opts, device, self.baseline_dir)

    def test(self, model: Any, datamodule: DenoiseData, opts: DenoiseEvalOptions, selection: DenoiseSelection,
             device: torch.device) -> Outcome:
        run = run_test_pass(datamodule, selection, opts, model, device)
        report = build_report(model, datamodule, opts, selection, run, device)
        return Outcome(report, {"kept": {lkey: s.kept for lkey, s in run.levels.items()}, "opts": opts})

    def write(self, outcome: Outcome, out_dir: Path) -> None:
        report, opts, kept = outcome.report, outcome.figures["opts"], outcome.figures["kept"]
        write_results_table(report, out_dir)
        write_speed_table(report, out_dir)
        names = ["clean", *report["methods"]]
        write_images(kept, names, out_dir, opts.write_tiff, opts.write_nifti)
        if opts.figures:
            write_figures(report, kept, names, out_dir)
        print_report(report)


def run(model: Any, datamodule: Any, eval_cfg: Any, out_dir: str | Path,
        device: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Evaluate a conditional denoising model against the noisy input, NLM and a supervised U-Net.

    Args:
        model: provides :class:`~meddiff.protocols.denoise.interfaces.DenoiseModel` (``reconstruct({"cond": ...},
            sampling)`` -> ``[B, C, H, W]`` in ``[-1, 1]``, ``sampling``, ``schedule``), e.g.
            ``ConditionalDiffusion``.
        datamodule: provides :class:`~meddiff.protocols.denoise.interfaces.DenoiseData` (``noise_std``,
            ``noisy_dataset(split, noise_std)``, ``split_names()``, ``train_dataloader()``), set up.
        eval_cfg: ``DenoiseEvalOptions`` fields as a dict (``configs/eval/denoise.yaml``).
        out_dir: where report, tables, figures and images go.
        device: where the networks run.

    Returns:
        The report (JSON-ready) with ``summary``: ``{"<metric>/<method>@<level>": float}`` plus the quality-bar
        flags; also written to ``out_dir/report.json``.

    Raises:
        ConfigError: bad options, a model without ``reconstruct`` / ``sampling``, a DataModule without ``DenoiseData``.
        DataError: an empty test split.
    """
    return DenoiseProtocol().run(model, datamodule, eval_cfg, out_dir, device)
