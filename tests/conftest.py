import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def backbone():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate")
    return instantiate(cfg.model)


@pytest.fixture(scope="session")
def easy_samples():
    from lvlm_ctrl.data import build_dataset

    return build_dataset("easy_vqa", split="val", limit=64).samples


def run_cli(module: str, *overrides: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=600, check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> a tiny random checkpoint of it built by the project's script (once per session)."""
    from lvlm_ctrl.backbone.build_tiny import build

    root, built = tmp_path_factory.mktemp("tiny_models"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build(family, root / family)
        return built[family]
    return get


@pytest.fixture(scope="session")
def tiny_backbones(tiny_checkpoints):
    """family -> its tiny checkpoint loaded as a Backbone with the family's model config."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    loaded = {}

    def get(family: str):
        if family not in loaded:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="evaluate", overrides=[f"model={family}",
                                                                 f"model.path={tiny_checkpoints(family)}"])
            loaded[family] = instantiate(cfg.model)
        return loaded[family]
    return get
