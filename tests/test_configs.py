"""Every shipped config composes and instantiates its data and model (no training, no prepare_data, no downloads),
and the config tree stays lean: experiments state only what differs from their defaults, demos build on their full
experiment, the model families share one base, and the DataModules share option names."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# every CPU demo builds on the full experiment it shrinks
DEMO_PARENT = {"demo": "mnist_splotch", "demo_ct": "rsna_pddpm", "demo_denoise": "cdm4mi_denoise",
               "demo_adni": "adni_cfg", "demo_coarse": "brainomaly_coarse", "demo_refiner": "brainomaly_refiner"}
MODEL_BASE = "diffusion_base"


def _paths(root: Path) -> list[str]:
    # paths.output_dir / work_dir are Hydra runtime values; data lands under tmp, never in the repo
    return [f"paths.root_dir={root}", f"paths.output_dir={root}/out", f"paths.work_dir={root}"]


def _compose(config_name: str, overrides: list[str], config_dir: Path = CONFIGS) -> DictConfig:
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def _leaves(node: Any, path: tuple = ()) -> list[tuple]:
    """Key paths of the leaves of a plain dict (lists and empty dicts are leaves)."""
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in _leaves(v, path + (k,))]
    return [path]


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(path)
        node = node[key]
    return node


def _read(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """A tiny local UNet2DModel folder for experiment=rsna_pddpm_pretrained (its net.pretrained_dir is ???)."""
    from diffusers import UNet2DModel

    folder = tmp_path_factory.mktemp("pretrained") / "unet"
    UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(folder)
    return folder


def _check_instantiates(cfg: DictConfig, root: Path) -> None:
    OmegaConf.resolve(cfg)  # every interpolation resolves (e.g. ${model.noise}, ${paths.data_dir})
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    assert isinstance(datamodule, L.LightningDataModule)
    assert isinstance(model, L.LightningModule)
    assert not (root / "data").exists(), "instantiating a DataModule must not write data (that is prepare_data)"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment: str, tmp_path: Path, pretrained_dir: Path) -> None:
    overrides = [f"experiment={experiment}", *_paths(tmp_path)]
    if experiment == "rsna_pddpm_pretrained":
        overrides.append(f"net.pretrained_dir={pretrained_dir}")
    cfg = _compose("train", overrides)
    assert cfg.experiment_name == experiment
    if cfg.model.get("coarse_ckpt") is not None:
        # the refiner's second stage needs the first stage's generator: without it, a clear error saying so
        # (tests/integration/test_refiner_cli.py trains both stages)
        OmegaConf.resolve(cfg)
        assert isinstance(instantiate(cfg.data), L.LightningDataModule)
        with pytest.raises(Exception, match="Train the coarse stage first"):
            instantiate(cfg.model)
        return
    _check_instantiates(cfg, tmp_path)


def test_train_defaults_compose_and_instantiate(tmp_path: Path) -> None:
    _check_instantiates(_compose("train", _paths(tmp_path)), tmp_path)


@pytest.mark.parametrize("eval_option", [None] + sorted(p.stem for p in (CONFIGS / "eval").glob("*.yaml")))
def test_eval_config_composes(eval_option: str | None, tmp_path: Path) -> None:
    overrides = ["ckpt_path=run/checkpoints/last.ckpt", *_paths(tmp_path)]
    if eval_option is not None:
        overrides.append(f"eval={eval_option}")
    cfg = _compose("eval", overrides)
    assert cfg.ckpt_path == "run/checkpoints/last.ckpt"
    assert ("eval" in cfg) == (eval_option is not None)
    if eval_option == "denoise":  # eval.supervised.net: ${net} comes from the checkpoint's config at eval time
        cfg.eval.supervised.net = None
    OmegaConf.resolve(cfg)


@pytest.fixture(scope="module")
def probe_configs(tmp_path_factory) -> Path:
    """A copy of configs/ with, per experiment, `_probe_<name>.yaml`: its defaults list alone (no values)."""
    root = tmp_path_factory.mktemp("configs") / "configs"
    shutil.copytree(CONFIGS, root)
    for name in EXPERIMENTS:
        defaults = _read(CONFIGS / "experiment" / f"{name}.yaml").get("defaults", [])
        (root / "experiment" / f"_probe_{name}.yaml").write_text(
            "# @package _global_\n" + yaml.safe_dump({"defaults": defaults}))
    return root


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_states_only_what_differs(experiment: str, probe_configs: Path, tmp_path: Path) -> None:
    """No value in an experiment equals what its defaults list (groups, or the parent experiment) composes to."""
    values = _read(CONFIGS / "experiment" / f"{experiment}.yaml")
    values.pop("defaults", None)
    full = _compose("train", [f"experiment={experiment}", *_paths(tmp_path)], probe_configs)
    base = _compose("train", [f"experiment=_probe_{experiment}", *_paths(tmp_path)], probe_configs)
    full_values = OmegaConf.to_container(full, resolve=True)
    base_values = OmegaConf.to_container(base, resolve=True)
    restated = []
    for path in _leaves(values):
        try:
            default = _get(base_values, path)
        except KeyError:
            continue  # a key the defaults do not have
        value = _get(full_values, path)
        if value == default and type(value) is type(default):
            restated.append(f"{'.'.join(map(str, path))}={value!r}")
    assert not restated, f"experiment/{experiment}.yaml restates values its defaults already give: {restated}"


@pytest.mark.parametrize("demo", sorted(DEMO_PARENT))
def test_demo_builds_on_its_full_experiment(demo: str) -> None:
    defaults = _read(CONFIGS / "experiment" / f"{demo}.yaml")["defaults"]
    assert defaults[0] == f"/experiment/{DEMO_PARENT[demo]}", (
        f"experiment/{demo}.yaml must start its defaults with /experiment/{DEMO_PARENT[demo]}")
    assert defaults[-1] == "_self_"
    parent = _read(CONFIGS / "experiment" / f"{DEMO_PARENT[demo]}.yaml")["defaults"]
    assert not [d for d in defaults[1:-1] if d in parent], "a demo repeats a group choice of its parent"


def test_demo_list_is_complete() -> None:
    demos = {e for e in EXPERIMENTS if e.startswith("demo")}
    assert demos == set(DEMO_PARENT), f"new demo experiment(s) {sorted(demos - set(DEMO_PARENT))}: add to DEMO_PARENT"
    assert set(DEMO_PARENT.values()) <= set(EXPERIMENTS)


def test_model_families_share_one_base() -> None:
    base = _read(CONFIGS / "model" / f"{MODEL_BASE}.yaml")
    assert "defaults" not in base and base["_target_"] == "???"
    # every diffusion model family (the coarse GAN of the refiner family is no diffusion model)
    families = sorted(p for p in (CONFIGS / "model").glob("*.yaml") if p.stem not in (MODEL_BASE, "coarse_gan"))
    assert {p.stem for p in families} >= {"unconditional", "conditional", "guided"}
    for path in families:
        family = _read(path)
        defaults = family.pop("defaults", None)
        eval_default = [d for d in defaults or [] if isinstance(d, dict)]
        assert defaults == [MODEL_BASE, *eval_default, "_self_"] and len(eval_default) == 1, (
            f"{path.name}: defaults: [{MODEL_BASE}, override /eval@_global_.eval: <its protocol's options>, _self_]")
        assert family["_target_"] != "???"
        restated = [".".join(p) for p in _leaves(family) if p != ("_target_",) and _leaves_equal(base, p, family)]
        assert not restated, f"model/{path.name} restates {MODEL_BASE} values: {restated}"


def _leaves_equal(base: dict, path: tuple, family: dict) -> bool:
    try:
        return _get(base, path) == _get(family, path)
    except KeyError:
        return False


def test_no_unused_model_keys() -> None:
    # one sampling vocabulary: every diffusion family nests model.sampling; none of the old spellings is left
    old = {"recon", "val_recon", "translate", "sample_steps", "sample_seed", "num_steps", "val_num_steps",
           "val_score_batches", "val_psnr_batches", "val_sample_steps", "timestep_spacing", "num_samples"}
    for path in (CONFIGS / "model").glob("*.yaml"):
        assert not old & set(_read(path)), f"model/{path.name} uses old sampling keys {sorted(old & set(_read(path)))}"
    for path in (CONFIGS / "experiment").glob("*.yaml"):
        model = _read(path).get("model") or {}
        assert not old & set(model), f"experiment/{path.name} uses old model keys {sorted(old & set(model))}"


OLD_NAMES = {"val_frac": "val_fraction", "test_frac": "test_fraction", "split_seed": "seed"}


def test_datamodules_share_option_names() -> None:
    """Split options are named the same in every data config and every experiment's data section."""
    sections = {f"data/{p.name}": _read(p) for p in (CONFIGS / "data").glob("*.yaml")}
    sections.update({f"experiment/{p.name}": _read(p).get("data") or {} for p in (CONFIGS / "experiment").glob("*.yaml")})
    for where, data in sections.items():
        old = sorted(set(data) & set(OLD_NAMES))
        assert not old, f"{where}: rename {[f'{k} -> {OLD_NAMES[k]}' for k in old]}"
    for name, data in sections.items():
        if name == "data/image_folder.yaml":  # its test split is a folder; validation can be carved from train
            assert {"val_fraction", "seed", "batch_size", "num_workers"} <= set(data), name
        elif name.startswith("data/"):
            assert {"val_fraction", "test_fraction", "seed", "batch_size", "num_workers"} <= set(data), name


# ------------------------------------------------------------------------------- model <-> eval (issue 15 item 7)
def protocol_options_class(name: str) -> type:
    """The options dataclass of registered protocol ``name`` (every built-in protocol is a ``Protocol`` class)."""
    from meddiff.protocols import protocol_class

    cls = protocol_class(name)
    assert cls is not None, f"protocol {name!r} is registered as a bare function: it has no options class"
    return cls.options


def _model_protocol(cfg: DictConfig) -> str:
    from hydra.utils import get_class

    return get_class(cfg.model._target_).eval_protocol


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_eval_group_parses_with_its_models_protocol_options(experiment: str, tmp_path: Path) -> None:
    """The eval group an experiment composes is read by the options class of the protocol its model names."""
    from meddiff.utils.options import options_from

    cfg = _compose("train", [f"experiment={experiment}", *_paths(tmp_path)])
    name = _model_protocol(cfg)
    options_from(protocol_options_class(name), OmegaConf.to_container(cfg.eval, resolve=True), "eval")


@pytest.mark.parametrize("family", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml") if p.stem != MODEL_BASE))
def test_model_family_config_carries_its_eval_default(family: str, tmp_path: Path) -> None:
    """`model=<family>` alone (no eval=...) composes the eval group its protocol reads (e.g. model=guided ->
    eval=guided), and a command-line eval= still wins."""
    from meddiff.utils.options import options_from

    cfg = _compose("train", [f"model={family}", *_paths(tmp_path)])
    options_from(protocol_options_class(_model_protocol(cfg)), OmegaConf.to_container(cfg.eval, resolve=True),
                 "eval")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        chosen = compose("train", overrides=[f"model={family}", "eval=denoise", *_paths(tmp_path)],
                         return_hydra_config=True).hydra.runtime.choices.eval
    assert chosen == "denoise"
