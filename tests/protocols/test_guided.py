"""Guided evaluation protocol: per-slice similarity, per-volume outputs, validation-chosen reduction, AUROCs,
inputs (volume / dataset.json / record), skipping broken volumes, option errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from meddiff.data import ADNISliceDataModule
from meddiff.data.formats.adni_json import CLASS_NAMES
from meddiff.data.synthetic.mri import write_synthetic_adni
from meddiff.diffusion import NoiseSchedule
from meddiff.errors import ConfigError, DataError
from meddiff.metrics.image_quality import image_scores, ms_ssim, ms_ssim_scales
from meddiff.models.guided import GuidedDiffusion
from meddiff.protocols import guided as ev

FAST = {"n_boot": 50, "volume_plots": True, "batch_size": 64}


# the protocol reads volumes through its interfaces (protocols/guided/interfaces.py): these stand-ins provide them
@dataclasses.dataclass
class VolumeData:
    images: torch.Tensor
    masks: torch.Tensor
    axes: np.ndarray
    indices: np.ndarray


@dataclasses.dataclass
class VolumeSource:
    volume_id: str
    slice_label: int | None
    load: Callable[[], VolumeData]
    name: str = ""
    subject: str | None = None

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.slice_label - 1] if self.slice_label else "?"


@dataclasses.dataclass
class Volumes:
    sources: list[VolumeSource]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    batch: bool = True


class ZeroEps(nn.Module):
    """eps = 0 for every class: DDIM inversion + guided DDIM returns the input exactly (identity translation)."""

    num_class_embeds = 6

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        return torch.zeros_like(x)


class Darken(ZeroEps):
    """The CN branch predicts x0 = x - 0.5 inside the head (x > -0.9): the counterfactual is darker there."""

    def forward(self, x, t, class_labels=None):
        out = torch.zeros_like(x)
        cn = class_labels == 0
        out[cn] = torch.where(x[cn] > -0.9, torch.full_like(x[cn], 0.25), out[cn])
        return out


def make_model(net: nn.Module) -> GuidedDiffusion:
    schedule = NoiseSchedule(
        num_train_timesteps=100,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.2,
        prediction_type="epsilon",
    )
    return GuidedDiffusion(
        net=net,
        schedule=schedule,
        ema_decay=0,
        sampling={"t_start": 40, "steps": 2, "guidance_scale": 3.0},
    ).eval()


@pytest.fixture(scope="module")
def dm(tmp_path_factory: pytest.TempPathFactory) -> ADNISliceDataModule:
    root = tmp_path_factory.mktemp("adni")
    write_synthetic_adni(root, n_per_class=2, shape=(24, 24, 24), seed=0)
    d = ADNISliceDataModule(root=str(root), image_size=16, val_fraction=0.2, test_fraction=0.4, cache_dir=None)
    d.prepare_data()
    d.setup("fit")
    d.setup("test")
    return d


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ end to end
def test_identity_translation_gives_perfect_similarity_and_all_outputs(dm, tmp_path) -> None:
    with pytest.warns(ev.MetricSkippedWarning) as rec:
        report = ev.run(make_model(ZeroEps()), dm, {**FAST, "t_start": 30}, tmp_path, "cpu")
    assert {"lpips", "fid"} <= set(report["metrics_skipped"]) and "vsi" not in report["metrics_skipped"]
    assert sum("skipped" in str(w.message) for w in rec) >= 2
    test_ids = [e.volume_id for e in dm.test_set.volumes]
    assert sorted(report["volumes"]) == sorted(test_ids)
    n_slices = sum(len(dm.test_set.volume_indices(v)) for v in test_ids)
    rows = read_csv(tmp_path / "slice_metrics.csv")
    assert len(rows) == n_slices == report["summary"]["n_slices"]
    # eps = 0 makes inversion + denoising the identity: SSIM = MS-SSIM = 1, PSNR at its cap, anomaly score 0
    assert report["summary"]["ssim_mean"] == pytest.approx(1.0, abs=1e-5)
    assert report["summary"]["ms_ssim_mean"] == pytest.approx(1.0, abs=1e-5)
    assert report["summary"]["psnr_mean"] == pytest.approx(100.0)
    assert report["summary"]["vsi_mean"] == pytest.approx(1.0, abs=1e-5)
    assert all(float(r["vsi"]) == pytest.approx(1.0, abs=1e-5) for r in rows)
    assert all(float(r["score"]) == pytest.approx(0.0, abs=1e-6) for r in rows)
    assert read_csv(tmp_path / "outlier_slices.csv") == []
    assert (
        report["translate"]["t_start"] == 30 and report["translate"]["guidance_scale"] == 3.0
    )  # eval overrides
    for v in test_ids:
        for p in report["figures"]["volumes"][v]:
            assert (tmp_path / p).is_file()
    for name in ("ssim_all_volumes.png", "worst_slices.png", "volume_scores.csv", "report.json"):
        assert (tmp_path / name).is_file(), name
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["summary"]["n_volumes"] == len(test_ids)
    cls = on_disk["classification"]["model"]
    assert set(cls) == {"EMCI_vs_CN", "MCI_vs_CN", "LMCI_vs_CN", "AD_vs_CN", "any_vs_CN"}
    assert "auroc_ci" in cls["AD_vs_CN"] and "skipped" in cls["MCI_vs_CN"]  # no MCI volume in this test split
    for key in ("baseline_mean_intensity", "baseline_nearest_healthy_image", "baseline_mean_healthy_image"):
        assert on_disk["classification"][key]["AD_vs_CN"]["resampled"] == "subjects", key
    # this fixture's validation split has one class: the defaults are kept and the report says so (not "validation")
    assert [e.slice_label for e in dm.val_set.volumes].count(1) in (0, len(dm.val_set.volumes))
    assert on_disk["selection"]["chosen_on"] == "defaults"
    assert on_disk["selection"]["splits_read"] == ["train", "val"]
    m = on_disk["margin_over_best_baseline"]
    assert m["baseline_chosen_on"] == "test" and m["verdict"] and "auroc_diff_ci" in m
    cost = on_disk["baselines_cost"]["baseline_nearest_healthy_image"]
    n_cn = sum(len(dm.train_set.volume_indices(e.volume_id)) for e in dm.train_set.volumes if e.slice_label == 1)
    assert cost["n_reference"] == cost["n_healthy_total"] == n_cn and cost["n_queries"] > 0
    # identity translation: every test slice has a nearest healthy training slice; the scores are the model's scorer
    assert all(float(r["baseline_nearest_healthy_image"]) >= 0 for r in rows)


def test_counterfactual_that_changes_the_head_lowers_ssim_and_lists_outliers(dm, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ev.MetricSkippedWarning)
        report = ev.run(
            make_model(Darken()),
            dm,
            {**FAST, "ssim_outlier": 0.99, "max_volumes": 2, "volume_plots": False, "guidance_scale": 1.0},
            tmp_path,
            "cpu",
        )
    rows = read_csv(tmp_path / "slice_metrics.csv")
    assert report["summary"]["ssim_mean"] < 0.9 and report["summary"]["n_volumes"] == 2
    assert report["ms_ssim_scales"]["used"] == [min(3, ms_ssim_scales(16, 16))]  # 16 px fits fewer than 3
    assert {r["class"] for r in rows} == {"CN", "EMCI"}  # the cap interleaves classes
    out = read_csv(tmp_path / "outlier_slices.csv")
    ssims = [float(r["ssim"]) for r in out]
    assert out and all(s < 0.99 for s in ssims) and ssims == sorted(ssims)
    assert len(out) == sum(float(r["ssim"]) < 0.99 for r in rows)
    assert all(float(r["score"]) > 0 for r in rows)
    assert not (tmp_path / "volumes").exists()


def test_per_slice_metrics_match_the_metric_functions_at_48_px() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 1, 48, 48, generator=g) * 2 - 1
    masks = torch.zeros(5, 1, 48, 48, dtype=torch.bool)
    masks[:, :, 8:40, 8:40] = True
    data = VolumeData(images, masks, np.zeros(5, dtype=np.int64), np.arange(5))
    model = make_model(Darken())
    opts = ev.GuidedEvalOptions(batch_size=2)  # batches of 2: results must not depend on batching
    res = ev.translate_volume(model, VolumeSource("v", 5, lambda: data), model.sampling, opts, "cpu")
    healthy = model.healthy_counterfactual(images)
    assert res.ms_ssim_scales == 3 == ms_ssim_scales(48, 48)
    np.testing.assert_allclose(res.metrics["ms_ssim"], ms_ssim(images, healthy, scales=3).numpy(), atol=1e-5)
    q = image_scores(images, healthy, max_psnr=100.0)
    np.testing.assert_allclose(res.metrics["ssim"], q["ssim"].numpy(), atol=1e-5)
    np.testing.assert_allclose(res.metrics["psnr"], q["psnr"].numpy(), atol=1e-4)
    inside = ((images - healthy).abs() * masks).sum((1, 2, 3)) / masks.sum((1, 2, 3))
    np.testing.assert_allclose(res.score, inside.numpy(), atol=1e-5)  # mean |x - h| inside the brain mask
    np.testing.assert_allclose(
        res.baseline, ((images * masks).sum((1, 2, 3)) / masks.sum((1, 2, 3))).numpy(), atol=1e-5
    )
    assert res.ids == [f"v:0:{i}" for i in range(5)]


# ------------------------------------------------------------------------------------------ inputs
def test_dataset_json_input_skips_and_lists_broken_entries(dm, tmp_path) -> None:
    task = dm.task_dir
    records = [
        {"image": str(task / "cn/cn0.nii.gz"), "slice_label": 1},
        {"image": str(task / "ad/missing.nii.gz"), "slice_label": 5},
        {"image": str(task / "ad/ad0.nii.gz"), "slice_label": 7},
        {"image": str(task / "ad/ad1.nii.gz"), "slice_label": 5},
        {"image": str(tmp_path / "cut4d.nii.gz"), "slice_label": 5},
        {"image": str(tmp_path / "const.nii.gz"), "slice_label": 1},
    ]
    ex4d = (Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz").read_bytes()
    (tmp_path / "cut4d.nii.gz").write_bytes(ex4d[: len(ex4d) // 2])  # a truncated 4D file: a raw EOFError before
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), 3, np.int16), np.eye(4)), str(tmp_path / "const.nii.gz"))
    js = tmp_path / "dataset.json"
    js.write_text(json.dumps(records))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        report = ev.run(
            make_model(ZeroEps()),
            dm,
            {**FAST, "input": str(js), "volume_plots": False},
            tmp_path / "out",
            "cpu",
        )
    assert sorted(report["volumes"]) == ["ad1", "cn0"]  # absolute image paths: ids are file names
    reasons = {s["volume"]: s["reason"] for s in report["skipped"]}
    assert any("entry #1" in r and "missing.nii.gz" in r and "does not exist" in r for r in reasons.values())
    assert any("slice_label 7 is outside 1-5" in r for r in reasons.values())
    assert "cut4d.nii.gz" in reasons["cut4d"] and "truncated or corrupt" in reasons["cut4d"]
    assert "const.nii.gz" in reasons["const"] and "constant volume" in reasons["const"]
    assert report["summary"]["n_skipped"] == 4
    assert any("skipped 4 volume(s)" in str(w.message) for w in rec)


def test_single_volume_inputs_and_clear_errors(dm, tmp_path) -> None:
    model = make_model(ZeroEps())
    vol = dm.task_dir / "ad/ad0.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ev.run(
            model,
            dm,
            {**FAST, "input": str(vol), "input_label": "AD", "volume_plots": False},
            tmp_path / "a",
            "cpu",
        )
        assert list(report["volumes"]) == ["ad0"] and report["volumes"]["ad0"]["class"] == "AD"
        record = json.dumps({"image": str(vol), "label": 5})
        rep = ev.run(model, dm, {**FAST, "input": record, "volume_plots": False}, tmp_path / "b", "cpu")
        assert list(rep["volumes"]) == ["ad0"] and rep["volumes"]["ad0"]["slice_label"] == 5
        with pytest.raises(DataError, match="not found"):
            ev.run(model, dm, {**FAST, "input": str(tmp_path / "nope.nii.gz")}, tmp_path / "c", "cpu")
        flat = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), str(flat))
        with pytest.raises(DataError, match="flat.nii.gz"):
            ev.run(model, dm, {**FAST, "input": str(flat)}, tmp_path / "d", "cpu")
        cut = tmp_path / "cut.nii.gz"  # one truncated volume: an error naming it, not a raw EOFError
        cut.write_bytes(vol.read_bytes()[: vol.stat().st_size // 2])
        with pytest.raises(DataError, match=r"cut\.nii\.gz.*truncated or corrupt"):
            ev.run(model, dm, {**FAST, "input": str(cut), "input_label": "AD"}, tmp_path / "f", "cpu")
        with pytest.raises(DataError, match="slice_label 9 is outside"):
            ev.run(
                model,
                dm,
                {**FAST, "input": json.dumps({"image": str(vol), "label": 9})},
                tmp_path / "e",
                "cpu",
            )


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"guidance_scale": -1}, "guidance_scale=-1"),
        ({"t_start": 100}, "t_start=100"),
        ({"ssim_treshold": 0.5}, "Unknown eval option"),
        ({"reductions": ["mean", "mode"]}, "reductions"),
        ({"max_volumes": 0}, "max_volumes"),
    ],
)
def test_bad_eval_options(dm, tmp_path, cfg, match) -> None:
    with pytest.raises(ConfigError, match=match):
        ev.run(make_model(ZeroEps()), dm, cfg, tmp_path, "cpu")


# ------------------------------------------------------------------------------------------ protocol rules
class SpyData:
    """A DataModule seen through its public per-volume API, recording which volumes were asked for, in order."""

    def __init__(self, dm: ADNISliceDataModule) -> None:
        self.dm, self.calls = dm, []

    def volumes(self, split: str):  # noqa: ANN201
        self.calls.append(split)
        return self.dm.volumes(split)

    def input_volumes(self, spec, input_label=None, what="input"):  # noqa: ANN001, ANN201
        self.calls.append("input")
        return self.dm.input_volumes(spec, input_label, what)


SMALL = {**FAST, "volume_plots": False, "max_volumes": 2, "val_max_volumes": 2}


def test_choices_are_made_on_validation_before_the_test_volumes_are_read_once(dm, tmp_path) -> None:
    spy = SpyData(dm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ev.MetricSkippedWarning)
        report = ev.run(make_model(Darken()), spy, SMALL, tmp_path, "cpu")
    assert spy.calls == ["train", "val", "test"]  # the CN reference of the baselines, validation, then test once
    assert report["selection"]["n_val_volumes"] == min(2, len(dm.val_set.volumes)) >= 1
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "report.json").is_file()


class ZeroCounterfactual:
    """A stand-in for the model's translation: the healthy counterfactual is 0, so a slice's score is mean |x|."""

    def __init__(self, model: GuidedDiffusion) -> None:
        self.model = model

    def __call__(self, x, sampling=None, generator=None):  # noqa: ANN001, ANN204
        return torch.zeros_like(x)


class CraftedVolumes:
    """A VolumeDataModule whose val and test volumes disagree on the best slice -> volume reduction.

    Slices are constant images (score = that constant). Validation: CN flat 0.5, AD mostly 0.2 with one 0.9 slice
    (only p90 / max separate them). Test: the opposite (CN has the one bright slice): the validation choice (p90)
    gives AD-vs-CN AUROC 0 on test, a test choice (mean) would give 1.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    @staticmethod
    def _source(name: str, label: int, values: list[float]) -> VolumeSource:
        images = torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 1, 16, 16).clone()
        data = VolumeData(images, torch.ones_like(images, dtype=torch.bool), np.zeros(len(values), np.int64),
                             np.arange(len(values)))
        return VolumeSource(name, label, lambda: data)

    def volumes(self, split: str):  # noqa: ANN201
        self.calls.append(split)
        flat, spike = [0.5] * 4, [0.2, 0.2, 0.2, 0.9]
        if split == "train":
            srcs = [self._source(f"tr_cn{i}", 1, [0.3] * 4) for i in range(2)]
        elif split == "val":
            srcs = [self._source(f"va_cn{i}", 1, flat) for i in range(2)]
            srcs += [self._source(f"va_ad{i}", 5, spike) for i in range(2)]
        else:
            srcs = [self._source(f"te_cn{i}", 1, spike) for i in range(2)]
            srcs += [self._source(f"te_ad{i}", 5, flat) for i in range(2)]
        return Volumes(srcs, [], True)

    def input_volumes(self, spec, input_label=None, what="input"):  # noqa: ANN001, ANN201
        raise AssertionError("not used")


def test_the_slice_to_volume_reduction_is_chosen_on_validation_not_test(tmp_path) -> None:
    model = make_model(ZeroEps())
    model.healthy_counterfactual = ZeroCounterfactual(model)
    data = CraftedVolumes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ev.run(model, data, {**FAST, "volume_plots": False, "n_worst": 0}, tmp_path, "cpu")
    assert data.calls == ["train", "val", "test"]
    sel = report["selection"]
    assert sel["model_reduction"] == "p90" and sel["val_auroc"]["p90"] == 1.0 and sel["val_auroc"]["mean"] == 0.0
    assert sel["chosen_on"] == "validation" and sel["splits_read"] == ["train", "val"]
    assert report["margin_over_best_baseline"]["baseline_chosen_on"] == "validation"
    # scored with the validation choice, the test volumes are ranked the wrong way round: an honest AUROC of 0
    assert report["summary"]["auroc_ad_vs_cn"] == 0.0
    # the baselines' reductions come from validation too: the mean healthy slice is 0.3, so |x - 0.3| is 0.2 on flat
    # volumes and [0.1, 0.1, 0.1, 0.6] on spiked ones: mean wins on val, while median would score 1.0 on test
    assert sel["baselines"]["baseline_mean_healthy_image"]["reduction"] == "mean"
    assert report["classification"]["baseline_mean_healthy_image"]["AD_vs_CN"]["auroc"] == 0.0


def test_the_model_is_not_changed_by_eval_overrides(dm, tmp_path) -> None:
    model = make_model(Darken()).train()
    before = dataclasses.replace(model.sampling)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ev.MetricSkippedWarning)
        report = ev.run(model, dm, {**SMALL, "t_start": 30, "guidance_scale": 1.5, "num_steps": 1}, tmp_path, "cpu")
    assert (report["translate"]["t_start"], report["translate"]["guidance_scale"]) == (30, 1.5)
    assert report["translate"]["num_steps"] == 1
    assert model.sampling == before and model.sampling.t_start == 40 and model.sampling.steps == 2
    assert all(m.training for m in model.modules())  # train/eval flags restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_a_datamodule_without_the_volume_api_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="volumes\\(split\\).*data=adni_slices"):
        ev.run(make_model(ZeroEps()), object(), FAST, tmp_path, "cpu")


# ------------------------------------------------------------------------------------------ classification
def _result(label: int, scores, intensity) -> ev.VolumeResult:
    src = VolumeSource(f"v{label}_{np.random.rand():.6f}", label, lambda: None)
    n = len(scores)
    return ev.VolumeResult(
        src,
        [str(i) for i in range(n)],
        np.zeros(n),
        np.arange(n),
        {"ssim": np.ones(n), "psnr": np.ones(n), "ms_ssim": np.ones(n)},
        np.asarray(scores, float),
        np.asarray(intensity, float),
    )


def test_reduction_and_baseline_sign_are_chosen_on_validation() -> None:
    # CN volumes: uniform slice scores 0.5; AD volumes: mostly 0.2 with one very anomalous slice -> max separates,
    # mean does not; the baseline is lower (darker) for AD -> sign -1
    val = [
        _result(1, [0.5, 0.5, 0.5, 0.5], [0.3] * 4),
        _result(1, [0.45, 0.5, 0.55, 0.5], [0.35] * 4),
        _result(5, [0.2, 0.2, 0.2, 0.9], [0.1] * 4),
        _result(5, [0.1, 0.2, 0.2, 0.95], [0.0] * 4),
    ]
    choice = ev.choose_on_validation(val, ev.REDUCTIONS)
    assert choice["val_auroc"]["max"] == choice["val_auroc"]["p90"] == 1.0
    assert choice["model_reduction"] == "p90"  # ties go to the first candidate in eval.reductions
    assert ev.choose_on_validation(val, ("mean", "max"))["model_reduction"] == "max"
    assert choice["val_auroc"]["mean"] < 0.5
    assert choice["baseline_sign"] == -1
    one_class = ev.choose_on_validation(val[:2], ev.REDUCTIONS)
    assert one_class["model_reduction"] == "mean" and "defaults kept" in one_class["note"]


def test_volume_aurocs_per_class_vs_cn() -> None:
    test = [
        _result(1, [0.1], [0.0]),
        _result(1, [0.2], [0.0]),
        _result(5, [0.9], [0.5]),
        _result(5, [0.15], [0.5]),
        _result(2, [0.3], [0.1]),
    ]
    choice = {"model_reduction": "mean", "baseline_reduction": "mean", "baseline_sign": 1}
    section, curves = ev.classification(test, choice, n_boot=20, seed=0)
    assert section["model"]["AD_vs_CN"]["auroc"] == pytest.approx(0.75)  # 0.9 > both CN; 0.15 > one of two
    assert section["model"]["EMCI_vs_CN"]["auroc"] == pytest.approx(1.0)
    assert section["model"]["any_vs_CN"]["n"] == 5 and section["model"]["any_vs_CN"]["n_pos"] == 3
    assert "skipped" in section["model"]["MCI_vs_CN"]
    assert section["baseline_mean_intensity"]["AD_vs_CN"]["auroc"] == pytest.approx(1.0)
    assert set(curves) == {"guided CFG", "mean intensity (baseline)"}


def test_the_protocol_class_names_are_the_data_formats_ones() -> None:
    """The guided package declares the slice-label convention it reads instead of importing meddiff.data."""
    assert ev.CLASS_NAMES == CLASS_NAMES


def test_reduce_slices() -> None:
    s = np.array([1.0, 2.0, 3.0, np.nan, 10.0])
    assert ev.reduce_slices(s, "mean") == pytest.approx(4.0)
    assert ev.reduce_slices(s, "median") == pytest.approx(2.5)
    assert ev.reduce_slices(s, "max") == 10.0
    assert ev.reduce_slices(s, "p90") == pytest.approx(np.percentile([1, 2, 3, 10], 90))
    with pytest.raises(ConfigError):
        ev.reduce_slices(s, "sum")
