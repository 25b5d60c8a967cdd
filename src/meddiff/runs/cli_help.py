"""``--help`` pages of the entry points (Hydra's ``hydra.help.template`` = ``${meddiff.help:<job name>}``).

The experiment list is read from ``configs/experiment/*.yaml`` at the time of asking: one line each, the first
comment line of the file, so a new experiment documents itself. ``$APP_CONFIG_GROUPS`` and ``$FLAGS_HELP`` are
filled in by Hydra afterwards (``$$`` is a literal dollar).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

HELP_RESOLVER = "meddiff.help"
CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs"


def experiment_lines(config_dir: Path = CONFIG_DIR, width: int = 110) -> list[str]:
    """``"  <name>  <first comment line>"`` per experiment YAML."""
    files = sorted((config_dir / "experiment").glob("*.yaml"))
    if not files:
        return ["  (no configs/experiment/*.yaml found)"]
    pad = max(len(f.stem) for f in files) + 2
    lines = []
    for f in files:
        desc = ""
        for line in f.read_text().splitlines():
            s = line.strip()
            if s.startswith("#") and "@package" not in s:
                desc = s.lstrip("#").strip()
                if desc:
                    break
            elif s and not s.startswith("#"):
                break
        room = max(20, width - pad - 2)
        if len(desc) > room:
            desc = textwrap.shorten(desc, width=room, placeholder=" ...")
        lines.append(f"  {f.stem.ljust(pad)}{desc}")
    return lines


TRAIN_HELP = """\
meddiff-train: train a diffusion model, keep the best checkpoint by a validation metric, then evaluate that
checkpoint once on the test split (choices on validation, test touched once).

Usage: python -m meddiff.train [experiment=NAME] [group=option ...] [key=value ...]   (-m: a sweep, a,b: values)

== Experiments (experiment=NAME) ==
{experiments}

== Config groups (group=option) ==
$APP_CONFIG_GROUPS

== Common overrides ==
  trainer=cpu|gpu|mps|ddp  trainer.devices=2  trainer.max_epochs=20  trainer.precision=bf16-mixed
  trainer.limit_train_batches=0.1  trainer.limit_val_batches=5  trainer.val_check_interval=0.5
  data.batch_size=64  data.num_workers=4  data.root=/data/...  model.optimizer.lr=3e-4  seed=1
  logger=csv|tensorboard|wandb|many  tags=[a,b]  optimized_metric=val/auroc  torch_threads=1
  debug=fast_dev_run|limit|overfit|profiler   evaluate=false   hydra.run.dir=DIR
  resume=RUN_DIR (continue a run: same dir, step, optimizer, EMA, wandb run)   ckpt_path=FILE.ckpt

== Examples ==
  python -m meddiff.train experiment=demo                                   # CPU demo, report in the run dir
  python -m meddiff.train experiment=demo debug=fast_dev_run                # wiring check in seconds
  python -m meddiff.train -m experiment=demo model.optimizer.lr=1e-4,3e-4   # sweep: <sweep_dir>/summary.md
  python -m meddiff.train hparams_search=anomaly_optuna experiment=demo     # Optuna (rerun = resume)
  python -m meddiff.train resume=logs/train/runs/DATE                       # continue a killed run
  meddiff-compare logs/train/multiruns/DATE [more runs or sweeps] --diff    # compare runs, differing keys

Show the composed config: add --cfg job (--resolve to resolve it). Hydra's own flags: --hydra-help
"""

EVAL_HELP = """\
meddiff-eval: evaluate a checkpoint written by meddiff-train with its task's honest protocol (report.json,
metrics.csv, figures). The experiment config is read back from the checkpoint.

Usage: python -m meddiff.eval ckpt_path=RUN_DIR/checkpoints/FILE.ckpt [+data.KEY=...] [+model.KEY=...] [+eval.KEY=...]

== Config groups (group=option) ==
$APP_CONFIG_GROUPS

== Examples ==
  python -m meddiff.eval ckpt_path=logs/demo/latest/checkpoints/last.ckpt
  python -m meddiff.eval ckpt_path=... +eval.n_boot=2000 +data.root=/data/mnist
  python -m meddiff.eval ckpt_path=... eval=guided +eval.input=vol.nii.gz +eval.guidance_scale=3

Hydra's own flags: --hydra-help
"""


def help_text(job_name: str) -> str:
    if str(job_name) == "eval":
        return EVAL_HELP
    return TRAIN_HELP.format(experiments="\n".join(experiment_lines()))
