"""The protocol registry: names -> run functions, imported lazily; unknown names are a clear ConfigError."""

from __future__ import annotations

import sys

import pytest

import meddiff.protocols as protocols
from meddiff.errors import ConfigError
from meddiff.protocols import PROTOCOLS, get_protocol, register_protocol


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(PROTOCOLS)
    yield
    PROTOCOLS.clear()
    PROTOCOLS.update(saved)


def test_builtin_names_and_the_anomaly_entry():
    assert {"anomaly", "denoise", "guided"} <= set(PROTOCOLS)
    from meddiff.protocols.anomaly import AnomalyProtocol
    from meddiff.protocols.base import Protocol
    from meddiff.protocols.guided import GuidedProtocol

    for name, cls in (("anomaly", AnomalyProtocol), ("guided", GuidedProtocol)):
        run = get_protocol(name)
        assert isinstance(run.__self__, cls) and run.__func__ is Protocol.run  # the skeleton's run, not another path


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"eval_protocol='nope'.*\['anomaly', 'denoise', 'guided', 'refiner'\]"):
        get_protocol("nope")
    with pytest.raises(ConfigError, match="not a registered"):
        get_protocol(None)  # a model class that names no protocol


def test_register_a_function_with_the_decorator():
    @register_protocol("toy")
    def run(model, datamodule, eval_cfg, out_dir, device):
        return {"summary": {"x": 1.0}}

    assert get_protocol("toy") is run
    assert get_protocol("toy")(None, None, {}, None, "cpu") == {"summary": {"x": 1.0}}


def test_register_a_module_path_is_lazy(tmp_path, monkeypatch):
    (tmp_path / "my_protocol.py").write_text("def run(model, datamodule, eval_cfg, out_dir, device):\n"
                                             "    return {'summary': {}}\n")
    (tmp_path / "no_run.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_protocol("mine", "my_protocol")
    assert "my_protocol" not in sys.modules  # registering imports nothing
    assert get_protocol("mine").__module__ == "my_protocol"
    register_protocol("broken", "no_run")
    with pytest.raises(ConfigError, match="defines no run"):
        get_protocol("broken")
    with pytest.raises(ConfigError, match="module path or a run function"):
        register_protocol("bad", 3)  # type: ignore[arg-type]


def test_register_a_protocol_class(tmp_path, monkeypatch):
    (tmp_path / "cls_protocol.py").write_text("from meddiff.protocols.base import Protocol\n"
                                              "class Mine(Protocol):\n"
                                              "    name = 'mine'\n"
                                              "    def select(self, *a): ...\n"
                                              "    def test(self, *a): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_protocol("mine", "cls_protocol:Mine")
    assert "cls_protocol" not in sys.modules
    assert type(get_protocol("mine").__self__).__name__ == "Mine"
    register_protocol("missing", "cls_protocol:Nope")
    with pytest.raises(ConfigError, match="no class Nope"):
        get_protocol("missing")


def test_importing_the_package_imports_no_protocol():
    assert protocols.__name__ == "meddiff.protocols"
    assert all(isinstance(v, str) for k, v in PROTOCOLS.items() if k in ("anomaly", "denoise", "guided"))
