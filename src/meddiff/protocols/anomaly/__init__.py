"""The evaluation protocol every anomaly-detection experiment shares (registry name ``anomaly``).

1. Reconstruct every validation image once per candidate reconstruction depth ``t_start``; score it under each
   candidate post-processing setting (map kind x median filter x reduction). The (depth, setting) with the best
   validation image AUROC is chosen, and the pixel threshold that maximises pooled validation Dice for it.
2. Reconstruct every test image once and score it with the chosen setting: image AUROC/AUPRC with bootstrap 95%
   CIs (resampling subjects / patients where batches carry ``subject``, items otherwise), pixel AUROC/AUPRC
   (binned, bounded memory), Dice at the validation threshold, and the oracle best Dice (chosen on test: labelled
   ``oracle``, not a result), plus subject-level AUROC where the data has subjects. The same reconstructions are
   also scored with the model's configured scoring, unchanged (``report["fixed_scoring"]``, summary ``fixed_*``):
   for pDDPM the published one (median filter 5, mean over the brain mask), to compare with the paper's tables.
3. Trivial baselines, evaluated by the same protocol beside the model (``meddiff.protocols.common``):

   - mean intensity inside the region (image score) and the intensity itself (pixel map);
   - the nearest healthy training image (pixel-space L2 neighbour among a fixed seeded subset of <= 10,000
     healthy training images, inside the brain mask where there is one) and the mean healthy image (of the same
     images), each used as a "reconstruction": scored by the same scorer under the same candidate settings, each
     with its own setting and pixel threshold chosen on validation.

   ``report["margin_over_best_baseline"]`` is a paired bootstrap 95% CI of "model - best baseline" image AUROC (the
   best baseline chosen by validation AUROC); ``report["baselines_cost"]`` is what the healthy-set baselines cost.

The test split is touched once; nothing is chosen on it except the clearly labelled oracle numbers. ``chosen_on``
fields say what the code did: ``"validation"`` only when candidates were compared on validation items
(``n_validation_items``), ``"config"`` when the configured setting was kept; ``selection["splits_read"]`` lists the
splits selection asked for (``meddiff.protocols.base.ValidationView``). The model is never changed: candidate depths
are copies of ``model.sampling`` (``dataclasses.replace(model.sampling, t_start=...)``) passed to
``model.reconstruct(batch, sampling)``, and the chosen one is written into the report (``reconstruction``); images
are scored with ``model.anomaly_val.scoring`` (the anomaly-validation component's scorer) and the candidates.
``report["runtime"]`` records the precision the model's network actually ran with during the test pass (parameter
dtype, autocast) and torch's thread count. Batch fields switch add-ons on
(``addons``): ``subtypes`` (RSNA CT) adds per-subtype results and figures (``ct_subtypes``).

Files: ``options`` (``eval:``), ``interfaces`` (what is read from model and data), ``passes`` (one pass over a
split), ``select``, ``test``, ``report``, ``addons`` + ``ct_subtypes``, ``protocol`` (the class on the skeleton).
Entry points: :data:`run` (the registry's: ``AnomalyProtocol().run``) and :func:`evaluate_anomaly_detection` (the
same steps on two loaders and optionally the healthy training set; returns the report, writes nothing).
"""

from meddiff.protocols.common import HEALTHY_BASELINES, LABELS, MEAN_INTENSITY, MODEL, SHORT

from .options import EvalOptions
from .protocol import AnomalyProtocol, evaluate_anomaly_detection
from .report import PIXEL_INTENSITY, print_report
from .select import AnomalySelection, BaselineChoice, select_on_validation
from .test import evaluate_on_test

__all__ = ["HEALTHY_BASELINES", "LABELS", "MEAN_INTENSITY", "MODEL", "PIXEL_INTENSITY", "SHORT", "AnomalyProtocol",
           "AnomalySelection", "BaselineChoice", "EvalOptions", "evaluate_anomaly_detection", "evaluate_on_test",
           "print_report", "run", "select_on_validation"]

#: the registry's ``run(model, datamodule, eval_cfg, out_dir, device) -> report``: the skeleton's run
run = AnomalyProtocol().run
