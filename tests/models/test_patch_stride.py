"""model.patch_stride (and model.sampling.stride) must be >= 1: 0 used to become the patch size silently."""

from __future__ import annotations

import pytest

from meddiff.errors import ConfigError
from meddiff.models import UnconditionalDiffusion
from meddiff.nets import build_net


@pytest.mark.parametrize("kw", [{"patch_stride": 0}, {"patch_stride": -2}, {"patch_stride": 1.5},
                                {"sampling": {"t_start": 30, "stride": 0}}])
def test_a_stride_below_one_is_a_config_error(tiny_net_cfg, schedule, kw):
    kw = {"sampling": {"t_start": 30}, **kw}
    name = "model.sampling.stride" if "stride" in kw["sampling"] else "model.patch_stride"
    with pytest.raises(ConfigError, match=rf"{name}=.* must be an integer >= 1"):
        UnconditionalDiffusion(net=build_net(tiny_net_cfg), schedule=schedule, patch_size=8, **kw)


def test_valid_strides_are_kept(tiny_net_cfg, schedule):
    model = UnconditionalDiffusion(net=build_net(tiny_net_cfg), schedule=schedule, patch_size=8, patch_stride=4,
                                   sampling={"t_start": 30})
    assert model.patch_stride == 4 and model.sampling.stride == 4
    model = UnconditionalDiffusion(net=build_net(tiny_net_cfg), schedule=schedule, patch_size=8, sampling={"t_start": 30})
    assert model.patch_stride == 8 and model.sampling.stride == 8
