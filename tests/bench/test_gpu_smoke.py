"""bench/gpu_smoke.py: the experiment list, and a clean exit without CUDA."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_smoke.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_size_experiments_leave_out_the_demos():
    names = _module().full_size_experiments()
    assert names and not any(n.startswith("demo") for n in names)
    assert {"mnist_splotch", "rsna_pddpm"} <= set(names)


def test_shapes_of_each_kind_of_experiment():
    mod = _module()
    cond = mod._shapes(mod._compose("cdm4mi_denoise", []))
    assert cond["cond_channels"] == 1 and cond["image_size"] == 64 and cond["batch_size"] == 16
    guided = mod._shapes(mod._compose("adni_cfg", []))
    assert guided["num_classes"] == 5 and guided["cond_channels"] == 0
    item = mod.SyntheticItems(4, guided)[3]
    assert item["image"].shape == (1, 128, 128) and 0 <= int(item["class_label"]) < 5
    assert mod._shapes(mod._compose("rsna_pddpm_pretrained", []))["image_channels"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine would run the benchmark")
def test_exits_zero_with_a_message_without_cuda():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
