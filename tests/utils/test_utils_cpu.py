"""CPU precision and thread choices."""

import logging

import pytest
import torch

from meddiff.errors import ConfigError
from meddiff.utils.cpu import (
    bf16_support,
    choose_precision,
    choose_threads,
    cpu_flags,
    cpu_report,
    usable_cpus,
)

AMD_AVX512_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
INTEL_AMX = "processor\t: 0\nflags\t\t: sse2 avx2 avx512f amx_bf16 amx_tile amx_int8\n"
OLD_X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


def _write(tmp_path, text):
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    return p


def test_flags_and_bf16_detection(tmp_path):
    assert bf16_support(cpu_flags(_write(tmp_path, AMD_AVX512_BF16)))["flags"] == ["avx512_bf16"]
    assert bf16_support(cpu_flags(_write(tmp_path, INTEL_AMX)))["native_bf16"]
    assert not bf16_support(cpu_flags(_write(tmp_path, OLD_X86)))["native_bf16"]
    assert cpu_flags(tmp_path / "missing") == set()
    assert isinstance(bf16_support()["torch_capability"], str)


def test_choose_precision(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="meddiff.utils.cpu"):
        assert choose_precision("auto", cpu_flags(_write(tmp_path, AMD_AVX512_BF16))) == "bf16-mixed"
        assert choose_precision("auto", cpu_flags(_write(tmp_path, OLD_X86))) == "32-true"
    assert "avx512_bf16" in caplog.text and "no native bf16" in caplog.text  # the choice is logged with its reason
    assert choose_precision("32-true", {"avx512_bf16"}) == "32-true"
    with pytest.raises(ConfigError, match="precision"):
        choose_precision("16-mixed")


@pytest.mark.parametrize(
    "load,n,expect",
    [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.7, 2, 1), (7.5, 2, 1), (1.0, 8, 7), (0.0, 1, 1), (2.6, 8, 5)],
)
def test_choose_threads_follows_the_load(load, n, expect):
    assert choose_threads("auto", load=load, n_cpus=n) == expect


def test_choose_threads_explicit_and_bad():
    assert choose_threads(3, load=100.0, n_cpus=2) == 3
    assert 1 <= choose_threads() <= usable_cpus()
    for bad in (0, -1, "many", True):
        with pytest.raises(ConfigError, match="threads"):
            choose_threads(bad)


def test_cpu_report_keys():
    r = cpu_report("bf16-mixed")
    assert r["precision"] == "bf16-mixed" and r["torch_threads"] == torch.get_num_threads()
    assert {"load_average_1min", "usable_cpus", "cpu_native_bf16", "cpu_flags"} <= set(r)
