"""Every option of every config group composes with the entry points that use it, resolves, and names
classes that exist (hydra.compose, as lightning-hydra-template's tests do)."""

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import ROOT

CONF = ROOT / "conf"
ENTRY_POINTS = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
REQUIRED = {("budget", "trace"): ["budget.path=budgets.txt"],  # options with a ??? value
            **{("model", m): ["model.path=/models/checkpoint"]
               for m in ("qwen3_vl_moe", "glm4v_moe", "internvl", "aria", "ernie4_5_vl_moe")}}
NOT_FOR = {("infer", "controller", "oracle")}  # evaluation only: it reads the evaluated split's profile


def cases():
    for entry in ENTRY_POINTS:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            defaults = compose(config_name=entry, return_hydra_config=True).hydra.runtime.choices
        used = {g for g in GROUPS if g in defaults}
        for group in sorted(used):
            for option in GROUPS[group]:
                if (entry, group, option) not in NOT_FOR:
                    yield entry, group, option


def targets(node) -> list[str]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append(node._target_)
        for value in node.values():
            found += targets(value)
    return found


def test_every_group_is_used_somewhere():
    used = {group for _, group, _ in cases()}
    assert used == set(GROUPS), set(GROUPS) - used


@pytest.mark.parametrize("entry, group, option", list(cases()))
def test_option_composes_resolves_and_targets_exist(tmp_path, entry, group, option):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.runtime.choices[group] == option
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig().set_config(cfg)
    plain = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.to_container(plain, resolve=True, throw_on_missing=True)  # every interpolation resolves
    for target in targets(plain):
        assert callable(hydra.utils.get_object(target)), target
    if group == "hparams_search":
        assert cfg.hydra.mode.name == "MULTIRUN" and "optuna" in cfg.hydra.sweeper._target_
        assert all(OmegaConf.select(cfg, key) is not None for key in cfg.hydra.sweeper.params), \
            "a searched parameter must exist in the config"
