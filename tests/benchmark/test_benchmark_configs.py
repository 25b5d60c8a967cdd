"""experiment=benchmark_uad: a multirun over every configs/benchmark_uad job file; each job composes to its task's
data and its method's model (and instantiates without writing data), with the residual sign chosen on validation."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
JOBS = sorted(p.stem for p in (CONFIGS / "benchmark_uad").glob("*.yaml") if not p.stem.startswith("_"))
MODEL = {"pddpm": "UnconditionalDiffusion", "dae": "DenoisingAutoencoder", "cddpm": "ConditionedDDPM"}
DATA = {"mnist_splotch": "MNISTSplotchDataModule", "rsna_ct_phantoms": "RSNACTDataModule",
        "adni_phantoms": "ADNISliceDataModule", "brainomaly_phantoms": "ImageFolderAnomalyDataModule"}
#: tasks whose jobs the default sweep must list (without the ADNI / Brainomaly ones the jobs run with
#: +benchmark_uad=...)
SWEPT_TASKS = {"mnist", "ct", "adni", "brainomaly"}


def test_the_sweep_lists_every_job_file_once() -> None:
    sweep = yaml.safe_load((CONFIGS / "experiment" / "benchmark_uad.yaml").read_text())["hydra"]
    assert sweep["mode"] == "MULTIRUN"
    listed = sweep["sweeper"]["params"]["+benchmark_uad"].split(",")
    assert set(listed) <= set(JOBS) and len(set(listed)) == len(listed)
    assert set(listed) >= {j for j in JOBS if j.split("_", 1)[0] in SWEPT_TASKS}
    assert {j.split("_", 1)[1] for j in JOBS} == set(MODEL)
    assert {j.split("_", 1)[0] for j in JOBS} >= {"mnist", "ct", "adni", "brainomaly"}


@pytest.mark.parametrize("job", JOBS)
def test_every_job_composes_to_its_task_and_method(job: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=benchmark_uad", f"+benchmark_uad={job}",
                                          f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out"])
    assert cfg.experiment_name == f"bench_{job}"
    assert list(cfg.eval.sign) == ["abs", "positive", "negative"]
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    assert isinstance(model, L.LightningModule) and type(model).__name__ == MODEL[cfg.bench.method]
    assert type(data).__name__ == DATA[cfg.bench.task]
    assert model.eval_protocol == "anomaly"
    assert not (tmp_path / "data").exists()
