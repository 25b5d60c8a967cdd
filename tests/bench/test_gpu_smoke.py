"""bench/gpu_smoke.py: the experiment list, a clean exit without CUDA, the timing arithmetic, and one tiny CPU run
whose CSV has every column (images/s, s/step, peak memory, loader starvation)."""

import csv
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


def test_loader_starvation_is_the_share_of_wall_time_between_steps():
    # warm-up step 0; timed steps 1..3, each 1 s of compute after a 1 s wait (the first timed wait is not counted)
    starts, ends = [0.0, 2.0, 4.0, 6.0], [1.0, 3.0, 5.0, 7.0]
    t = _module().timing(starts, ends, warmup=1)
    assert t["steps_timed"] == 3 and t["s_per_step"] == pytest.approx(5 / 3)
    assert t["loader_starvation"] == pytest.approx(2 / 5)


def test_tiny_cpu_run_writes_the_table_and_csv(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "smoke.csv"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--data", "synthetic",
                           "--num-workers", "0", "--experiments", "mnist_splotch,rsna_pddpm_pretrained",
                           "--csv", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starvation" in proc.stdout and "skipped" in proc.stdout  # the table; no weights: pretrained skipped
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == _module().CSV_COLUMNS
    mnist, pretrained = rows
    assert mnist["experiment"] == "mnist_splotch" and not mnist["error"], mnist
    assert float(mnist["s_per_step"]) > 0 and float(mnist["images_per_s"]) > 0 and float(mnist["peak_mem_GiB"]) > 0
    assert 0 <= float(mnist["loader_starvation"]) < 1 and int(mnist["steps_timed"]) == 4
    assert mnist["data"].startswith("synthetic") and mnist["image_shape"] == "1x28x28"
    assert pretrained["experiment"] == "rsna_pddpm_pretrained" and pretrained["error"].startswith("skipped")
