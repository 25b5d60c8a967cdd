"""Evaluation protocol ``guided``: translate MRI slices toward healthy (CN) and analyse them per volume (seed 004).

:class:`GuidedProtocol` on the skeleton (``run = GuidedProtocol().run``, the registry's for models with
``eval_protocol = "guided"``, e.g. ``GuidedDiffusion``). Files: ``options``, ``interfaces`` (what is read from the
model and the data), ``translate`` (per-volume translation and metrics), ``select``, ``test``, ``report``,
``protocol``.

Data come through public per-volume APIs only (:class:`~.interfaces.VolumeDataModule`: ``volumes(split)`` and
``input_volumes(spec, label)``, e.g. the ADNI slice DataModule); the model through
:class:`~.interfaces.GuidedModel`. The model is never changed: ``eval.*`` translation overrides make a copy of
``model.sampling`` (``dataclasses.replace``; ``report["translate"]`` records the settings used), and its device
and train/eval flags are restored after the run (``evaluating``).

Volumes: the test split of the DataModule, or ``eval.input`` = a ``.nii``/``.nii.gz`` volume (class from
``eval.input_label``, optional), a ``dataset.json`` (every entry; paths relative to the json's dir) or one
``dataset.json``-style record ``{"image": ..., "label": 1..5}`` (the seed's ``--infDict``). Slices are made with
the DataModule's slice settings, so they match training. ``max_volumes`` caps the count (classes interleaved so a
cap keeps every class); ``slice_stride`` keeps every k-th slice of a volume (quick looks).

Per slice (input ``x`` vs healthy counterfactual ``h``, both ``[1, S, S]`` in ``[-1, 1]``, whole image as in the
seed, data range 2): SSIM (11-px Gaussian window), PSNR (dB, capped at ``max_psnr``), MS-SSIM with
``ms_ssim_scales`` scales (default 3: the standard 5 need >= 176 px; 3 fit from 44 px, so 64 and 128 px runs use
the same definition; the first 3 standard betas rescaled to the full sum), and the anomaly score = mean of
``|x - h|`` inside the brain mask (the model's scorer, ``model.anomaly_val.scoring``). VSI (``eval.vsi``, on by default): meddiff's
torch VSI (:func:`meddiff.metrics.image_quality.image_scores`, whole image, data range 2). LPIPS (``lpips_torch_home``:
a ``$TORCH_HOME`` holding the torchvision AlexNet weights) and FID (``fid_weights``: torch-fidelity Inception
weights; per volume, inputs vs counterfactuals) run only when their weights (and packages) are there; otherwise
they are skipped with a one-line warning.

Per volume: ``volumes/<volume>_similarity.png`` (SSIM, MS-SSIM across slices) and ``volumes/<volume>_psnr.png``;
for all volumes ``ssim_all_volumes.png``; ``slice_metrics.csv`` (every slice), ``outlier_slices.csv`` (slices with
SSIM < ``ssim_outlier``, worst first) and ``worst_slices.png`` (input | healthy | |x - h| of the ``n_worst``
lowest-SSIM slices); ``volume_scores.csv``.

Classification use: a volume's score reduces its slice scores (``mean`` | ``median`` | ``p90`` | ``max``); the
reduction is chosen on the *validation* volumes (best AUROC of non-CN vs CN), as are the reduction and the sign of
the trivial baseline (mean intensity inside the brain mask; atrophy can make it go either way). Baselines beside the
model (``eval.baselines``): the nearest healthy training slice (:class:`meddiff.metrics.baselines.NearestHealthy`,
pixel-space L2 inside the brain mask) and the mean healthy slice (``MeanHealthy``), both from a fixed seeded subset of
<= ``baseline_max_items`` CN training slices; a slice's baseline score is the model's scorer applied to
``|x - baseline(x)|`` (mean inside the brain mask), reduced to a volume score with the baseline's own reduction chosen
on validation. Selection runs first, sees the DataModule through :class:`meddiff.protocols.base.ValidationView` and
asks only for ``volumes("train")`` (the CN reference) and ``volumes("val")``; ``selection["chosen_on"]`` and
``selection["splits_read"]`` record what it read. Then the test volumes are read once: AUROC/AUPRC with 95 % CIs
that resample subjects (:func:`meddiff.metrics.detection.detection_ci`) of AD vs CN, each class vs CN and
any-non-CN vs CN, model beside every baseline; ``report["margin_over_best_baseline"]``: a paired bootstrap CI of
"model - best baseline" AUROC (AD vs CN; the best baseline by validation AUROC) with a one-line verdict;
``report["baselines_cost"]``; and ``roc_ad_vs_cn.png``. Everything is written atomically (:mod:`meddiff.utils.io`) into ``out_dir``;
``report.json`` and ``metrics.csv`` (the summary) last.

A broken volume in a batch run (unreadable file, bad label, failure while translating) is skipped and listed in
``report["skipped"]`` (with a warning); a single-volume input that fails raises a ``DataError`` naming it.
"""

from .interfaces import CLASS_NAMES, GuidedModel, VolumeDataModule
from .options import REDUCTIONS, GuidedEvalOptions
from .protocol import GuidedProtocol
from .select import (
           GuidedSelection,
           choose_on_validation,
           healthy_baselines,
           reduce_slices,
           select_on_validation,
)
from .test import classification, margin, volume_scores
from .translate import HealthyBaselines, MetricSkippedWarning, VolumeResult, translate_many, translate_volume

__all__ = ["CLASS_NAMES", "REDUCTIONS", "GuidedEvalOptions", "GuidedModel", "GuidedProtocol", "GuidedSelection",
           "HealthyBaselines", "MetricSkippedWarning", "VolumeDataModule", "VolumeResult", "choose_on_validation",
           "classification", "healthy_baselines", "margin", "reduce_slices", "run", "select_on_validation",
           "translate_many", "translate_volume", "volume_scores"]

#: the registry's ``run(model, datamodule, eval_cfg, out_dir, device) -> report``: the skeleton's run
run = GuidedProtocol().run
