"""The trust boundary by class: what a config read from a file may build (issue 20), and the three payloads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from meddiff.errors import ConfigError
from meddiff.runs.checkpoint_io import CKPT_CONFIG_KEY, load_checkpoint
from meddiff.runs.resume import check_resumed_config, resume_argv
from meddiff.utils import safety
from meddiff.utils.safety import TRUSTED_CLASSES, check_config_targets, check_target, locate

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "demo_tiny_v0.1.ckpt"


@pytest.mark.parametrize("name", sorted(TRUSTED_CLASSES))
def test_every_name_on_the_list_resolves_to_a_class(name):
    # catches stale names when a class moves (then update the list and add a meddiff.compat row)
    assert isinstance(locate(name), type), f"{name} is not a class"
    check_target(name)


def test_a_stored_config_naming_the_old_lr_schedule_function_is_translated_to_its_class():
    from meddiff.compat import translate_stored_config
    from meddiff.runs.checkpoint_io import stored_config

    old = {"model": {"_target_": "meddiff.models.UnconditionalDiffusion",
                     "lr_scheduler": {"_target_": "meddiff.models.base.warmup_cosine", "_partial_": True,
                                      "warmup_steps": 100, "total_steps": 1100}}}
    with pytest.raises(ConfigError, match="'meddiff.models.base.warmup_cosine' is refused"):
        check_config_targets(old, "ckpt")  # untranslated, the old function's name is not trusted
    new = translate_stored_config(old)
    assert new["model"]["lr_scheduler"]["_target_"] == "meddiff.models.lr_schedules.WarmupCosineLR"
    check_config_targets(new, "ckpt")
    # the v0.1 demo checkpoint names the function: it loads naming the class
    assert stored_config(load_checkpoint(FIXTURE), FIXTURE)["model"]["lr_scheduler"]["_target_"] == \
        "meddiff.models.lr_schedules.WarmupCosineLR"


def test_a_function_is_refused_even_when_its_name_is_on_the_list(monkeypatch):
    name = "meddiff.models.lr_schedules.warmup_cosine_factor"
    monkeypatch.setattr(safety, "TRUSTED_CLASSES", TRUSTED_CLASSES | {name})
    with pytest.raises(ConfigError, match=f"model.lr_scheduler._target_='{name}' is not a class"):
        check_target(name, "model.lr_scheduler._target_")


def test_every_target_the_project_configs_name_is_on_the_list():
    targets = set()
    for path in (ROOT / "configs").rglob("*.yaml"):
        if path.parent.name in ("hparams_search",):  # hydra sweeper configs: the user's own launch, never stored
            continue
        targets |= set(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    assert targets - TRUSTED_CLASSES == set()


def test_the_defining_name_of_a_listed_class_passes_too():
    check_target("meddiff.models.unconditional.UnconditionalDiffusion")


@pytest.mark.parametrize("target", [
    "os.system", "subprocess.run", "builtins.eval", "posix.system", "shutil.copyfile",
    "meddiff.utils.io.atomic_write_text",        # a function of the project
    "meddiff.utils.io.os.system",                 # a walk through an import
    "diffusers.utils.dynamic_modules_utils.get_class_from_dynamic_module",
    "diffusers.UNet2DModel.from_pretrained",      # a classmethod is not a class
    "torch.nn.Conv2d", "torch.optim.lr_scheduler.LambdaLR",   # classes, but not ones a stored config needs
    "meddiff.__builtins__", "meddiffx.evil", "", 42,
])
def test_anything_else_is_refused_naming_the_target(target):
    with pytest.raises(ConfigError, match=re.escape(f"model._target_={target!r}")):
        check_target(target, "model._target_")


def test_nested_configs_are_walked_and_the_key_is_named():
    cfg = {"model": {"_target_": "meddiff.models.UnconditionalDiffusion",
                     "net": {"_target_": "meddiff.nets.MonaiUNet"},
                     "hooks": [{"_target_": "torch.optim.AdamW"}, {"_target_": "os.system", "_args_": ["id"]}]}}
    with pytest.raises(ConfigError, match=r"ckpt\.model\.hooks\[1\]\._target_='os\.system'"):
        check_config_targets(cfg, "ckpt")
    check_config_targets({"model": cfg["model"] | {"hooks": []}}, "ckpt")


# ------------------------------------------------------------------------------------------- the three payloads
def _checkpoint_with_model(tmp_path: Path, model_cfg: dict) -> Path:
    ckpt = load_checkpoint(FIXTURE)
    from meddiff.runs.checkpoint_io import plain_containers

    cfg = plain_containers(ckpt[CKPT_CONFIG_KEY])
    cfg["model"] = model_cfg
    ckpt[CKPT_CONFIG_KEY] = cfg
    path = tmp_path / "evil.ckpt"
    torch.save(plain_containers(ckpt), path)
    return path


def test_a_checkpoint_whose_model_writes_a_file_is_refused_and_no_file_appears(tmp_path):
    from meddiff.eval import load_from_checkpoint

    written = tmp_path / "pwned.txt"
    path = _checkpoint_with_model(tmp_path, {"_target_": "meddiff.utils.io.atomic_write_text", "path": str(written),
                                             "text": "owned"})
    with pytest.raises(ConfigError, match=r"model\._target_='meddiff\.utils\.io\.atomic_write_text' is refused"):
        load_from_checkpoint(path)
    assert not written.exists()


def test_a_checkpoint_chaining_a_diffusers_dynamic_module_is_refused(tmp_path):
    from meddiff.eval import load_from_checkpoint

    module = tmp_path / "evil_module.py"
    marker = tmp_path / "ran"
    model = {"_target_": "diffusers.utils.dynamic_modules_utils.get_class_from_dynamic_module",
             "pretrained_model_name_or_path": str(tmp_path), "module_file": "evil_module.py",
             "class_name": "X", "trust_remote_code": True,
             "writer": {"_target_": "meddiff.utils.io.atomic_write_text", "path": str(module),
                        "text": f"import os\nos.system('touch {marker}')\nclass X: pass\n"}}
    path = _checkpoint_with_model(tmp_path, model)
    with pytest.raises(ConfigError, match="get_class_from_dynamic_module' is refused"):
        load_from_checkpoint(path)
    assert not module.exists() and not marker.exists()


def _copied_run_dir(tmp_path: Path, extra: list[str]) -> Path:
    run = tmp_path / "copied_run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=demo", *extra]))
    (run / "config_resolved.yaml").write_text("seed: 42\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return run


def test_a_copied_run_dir_adding_a_callback_function_is_refused_on_resume(tmp_path):
    src, dst = tmp_path / "secret.txt", tmp_path / "stolen.txt"
    src.write_text("secret")
    run = _copied_run_dir(tmp_path, ["+callbacks.x._target_=shutil.copyfile", f"+callbacks.x.src={src}",
                                     f"+callbacks.x.dst={dst}"])
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(ConfigError, match=r"callbacks\.x\._target_='shutil\.copyfile' is refused"):
        resume_argv([f"resume={run}"])
    assert not dst.exists() and sorted(p.name for p in run.rglob("*")) == before


def test_a_copied_run_dir_setting_hydra_keys_is_refused_on_resume(tmp_path):
    run = _copied_run_dir(tmp_path, ["+hydra.callbacks.x._target_=shutil.copyfile"])
    with pytest.raises(ConfigError, match="hydra"):
        resume_argv([f"resume={run}"])


@pytest.mark.parametrize("group", ["callbacks", "logger", "trainer", "data", "model"])
def test_every_group_of_the_composed_resumed_config_is_checked(tmp_path, group):
    cfg = {"callbacks": {"ckpt": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint"}},
           "logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger"}},
           "trainer": {"_target_": "lightning.pytorch.Trainer"},
           "data": {"_target_": "meddiff.data.modules.mnist_splotch.MNISTSplotchDataModule"},
           "model": {"_target_": "meddiff.models.UnconditionalDiffusion"}}
    check_resumed_config(cfg, tmp_path)
    cfg[group] = {"x": {"_target_": "shutil.copyfile"}}
    with pytest.raises(ConfigError, match=rf"{group}\.x\._target_='shutil\.copyfile' is refused"):
        check_resumed_config(cfg, tmp_path)


def test_pretrained_diffusers_weights_never_trust_remote_code():
    for path in (ROOT / "src" / "meddiff" / "nets").rglob("*.py"):
        text = path.read_text()
        assert "trust_remote_code" not in text, path
        for line in (ln for ln in text.splitlines() if "from_pretrained(" in ln):
            assert "local_files_only=True" in line, (path, line)
