"""Denoising evaluation protocol (``eval_protocol = "denoise"``; CDM4MI), on the shared protocol skeleton.

For each noise level (default: the level(s) the model was trained on) the test patches get deterministic
Gaussian noise and are denoised by every method:

- ``noisy``: the noisy input itself (clipped to ``[-1, 1]``, like every method's output) - the trivial baseline;
- ``nlm``: non-local means (``skimage.restoration.denoise_nl_means``, ``sigma`` = the true noise std, ``h`` =
  factor x sigma with the factor chosen from a small grid on *validation* patches at that noise level);
- ``bm3d``: BM3D (``meddiff.metrics.denoisers``; an optional extra with a non-commercial licence: used when
  installed, reported as absent otherwise), ``sigma`` = the known noise std (or estimated per patch with
  ``bm3d_sigma: estimate``). At ~1 s per patch it can be capped to ``bm3d_max_slices`` of the test slices (evenly
  spread over the selected ones, deterministic, independent of any result); its rows then cover those slices and
  every paired comparison with it uses exactly those slices for both methods;
- ``supervised``: a U-Net of the model's family trained on the same training pairs (:mod:`.baseline`, cached in
  the run dir);
- ``ddim_<n>``: the conditional diffusion model, DDIM with ``n`` steps (``eta`` from the options);
- ``ddpm``: the conditional diffusion model, the full ancestral chain (every timestep).

Metrics (``meddiff.metrics.image_quality.image_scores``, explicit dynamic range, default 2.0 for ``[-1, 1]``):
PSNR (dB), SSIM, MAE and VSI per test patch, reported as mean and std over patches (``psnr``, ``psnr_std``, ...),
and per stitched slice (``slice_psnr``, ...). With ``mask: foreground`` only pixels whose clean value is above
``foreground_threshold`` count (NaN for an empty mask; averages skip them). Speed: wall seconds per patch of every
method at the evaluation batch size.

The steps, one file each:

- :mod:`.options`: ``DenoiseEvalOptions`` (``configs/eval/denoise.yaml``) and the constants of the quality bar;
- :mod:`.interfaces`: what is read from data (:class:`DenoiseData`) and model (:class:`DenoiseModel`);
- :mod:`.select`: the selection step, through :class:`meddiff.protocols.base.ValidationView` (asking it for test
  data raises): the supervised U-Net is fitted on the training pairs; at each level the NLM factor is chosen on
  ``val_patches`` validation patches (evenly spread); at the trained level(s) every method is also scored on them,
  and from those validation means come the best DDIM with <= 50 steps, the verdict "DDIM within 0.5 dB of DDPM",
  the model's sampler for the comparisons (the DDPM chain, else the best DDIM) and the best classical baseline
  (``noisy`` / ``nlm`` / ``bm3d``, by PSNR). Each choice records ``chosen_on``, derived from the splits it read;
- :mod:`.test`: the test pass, once per level, after every choice (``max_patches`` picks whole slices evenly
  spread over the test split, independent of any result);
- :mod:`.report`: the report; on test the model's margin over the chosen baseline (and over the supervised
  U-Net) gets a paired bootstrap CI across test slices (resampling volumes when the slices come from several), per
  metric; the test gap between DDPM and the chosen DDIM is reported beside the validation one.
  ``report["selection"]`` lists every choice with what it was chosen on and the splits selection read;
- :mod:`.outputs` / :mod:`.console`: the files and the rich tables.

Outputs in ``out_dir``: ``report.json`` (``summary`` = flat floats), ``metrics.csv`` (the skeleton's ``metric,value``
rows of the summary), ``results.csv`` (one row per level and method), ``speed.csv``, ``{psnr,ssim,mae,vsi}_vs_noise.png``, ``denoise_examples.png``, and for ``n_slices_out``
slices per noise level ``images/sigma<level>/`` TIFF hyperstacks and NIfTI stacks; all written atomically.

The model is never changed: the skeleton puts it in eval mode on ``device`` for the run and restores it afterwards.
"""

from meddiff.protocols.denoise.console import print_report
from meddiff.protocols.denoise.interfaces import DenoiseData, DenoiseModel
from meddiff.protocols.denoise.methods import nlm_denoise
from meddiff.protocols.denoise.options import (
    METRICS,
    DenoiseEvalOptions,
    SupervisedOptions,
    trained_noise_levels,
)
from meddiff.protocols.denoise.protocol import DenoiseProtocol, run
from meddiff.protocols.denoise.test import select_slices

__all__ = [
    "METRICS",
    "DenoiseData",
    "DenoiseEvalOptions",
    "DenoiseModel",
    "DenoiseProtocol",
    "SupervisedOptions",
    "nlm_denoise",
    "print_report",
    "run",
    "select_slices",
    "trained_noise_levels",
]
