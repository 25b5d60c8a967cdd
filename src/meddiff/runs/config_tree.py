"""The composed config printed at the start of a run (``print_config=true``, the default of ``configs/train.yaml``):
a rich tree, one branch per top-level group (data, model, trainer, ...), leaves as resolved YAML; plain YAML when
rich cannot draw (or is not installed). ``print_config=false`` turns it off."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

#: branches first, in this order (the rest follow in config order)
ORDER = ("data", "net", "schedule", "model", "callbacks", "logger", "trainer", "paths", "eval")


def config_tree(cfg: DictConfig, order: Sequence[str] = ORDER) -> Any:
    """A ``rich.tree.Tree`` of the resolved config: one branch per top-level key holding a mapping; scalars under
    ``(top level)``."""
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    scalars = {k: cfg[k] for k in keys if not OmegaConf.is_config(cfg[k])}
    for key in keys:
        if key in scalars:
            continue
        text = OmegaConf.to_yaml(cfg[key], resolve=True)
        tree.add(str(key), style="bold cyan").add(Syntax(text.rstrip() or "{}", "yaml", theme="ansi_dark"))
    if scalars:
        text = OmegaConf.to_yaml(OmegaConf.create(scalars), resolve=True)
        tree.add("(top level)", style="bold cyan").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    return tree


def print_config(cfg: DictConfig) -> None:
    """Print :func:`config_tree` (plain YAML without rich)."""
    try:
        from rich.console import Console
    except ImportError:  # rich is a dependency, but a print is no reason to fail a run
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return
    Console().print(config_tree(cfg))
