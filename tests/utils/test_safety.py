"""The target allow-list: what a config read from a file may instantiate."""

from __future__ import annotations

import pytest

from meddiff.errors import ConfigError
from meddiff.utils.safety import ALLOWED_TARGET_PREFIXES, check_config_targets, check_target


@pytest.mark.parametrize("target", ["meddiff.models.UnconditionalDiffusion", "meddiff.nets.MonaiUNet",
                                    "torch.optim.AdamW", "torch.optim.lr_scheduler.LambdaLR", "torch.nn.Conv2d",
                                    "meddiff.models.base.warmup_cosine", "monai.networks.nets.DiffusionModelUNet"])
def test_targets_of_allowed_packages_pass(target):
    check_target(target)


@pytest.mark.parametrize("target", [
    "os.system", "subprocess.run", "builtins.eval", "posix.system",
    "meddiff.utils.io.os.system",          # an allowed prefix walking through an import
    "torch.nn.modules.module.torch.load",  # the same inside torch.nn
    "meddiff.__builtins__",                 # dunder walks
    "torch.optim._functional",
    "meddiffx.evil",                        # a look-alike package name
    "", 42,
])
def test_anything_else_is_refused(target):
    with pytest.raises(ConfigError, match="not|names nothing"):
        check_target(target, "model._target_")


def test_nested_configs_are_walked_and_the_key_is_named():
    cfg = {"model": {"_target_": "meddiff.models.UnconditionalDiffusion",
                     "net": {"_target_": "meddiff.nets.MonaiUNet"},
                     "hooks": [{"_target_": "torch.nn.Identity"}, {"_target_": "os.system", "_args_": ["id"]}]}}
    with pytest.raises(ConfigError, match=r"ckpt\.model\.hooks\[1\]\._target_='os\.system'"):
        check_config_targets(cfg, "ckpt")
    check_config_targets({"model": cfg["model"] | {"hooks": []}}, "ckpt")


def test_the_allow_list_is_the_one_of_the_issue():
    assert ALLOWED_TARGET_PREFIXES == ("meddiff.", "torch.optim.", "torch.nn.", "monai.networks.", "diffusers.")
