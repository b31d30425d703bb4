"""Checkpoints load with weights_only=True: one from someone else never runs code, and anything that
is not a GRPO checkpoint is a one-line error, in evaluate, infer and BudgetedVQA.from_run."""

import pathlib
import shutil

import pytest
import torch

from lvlm_ctrl.errors import UserError
from tests.conftest import error_line, run_cli
from tests.test_train import N, compose_train, profile_dir  # noqa: F401  (fixture)


class Payload:
    """Unpickling this touches a file: what a hostile checkpoint would do with os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, profile_dir):  # noqa: F811
    from lvlm_ctrl.train import train

    run = tmp_path_factory.mktemp("run")
    train(compose_train(run, "controller=grpo", f"profile.path={profile_dir}", f"data.limit={N}", "logger=csv",
                        "trainer.max_steps=2", "profile.batch_size=8"))
    return run


def hostile_copy(run_dir, tmp_path):
    """The run with a best.ckpt that carries a payload beside its real contents."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["extra"] = Payload(tmp_path / "pwned")
    torch.save(ckpt, run / "checkpoints" / "best.ckpt")
    return run, tmp_path / "pwned"


def test_a_checkpoint_carrying_code_is_refused_everywhere(run_dir, tmp_path):
    from lvlm_ctrl.infer import BudgetedVQA

    run, marker = hostile_copy(run_dir, tmp_path)
    ckpt = run / "checkpoints" / "best.ckpt"
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 0, 0)).save(image)
    for module, args in (("lvlm_ctrl.evaluate", ["controller=grpo", f"ckpt={ckpt}", "data.limit=2"]),
                         ("lvlm_ctrl.infer", [f"ckpt={ckpt}", f"image={image}", "question=what?", "budget_ms=30"])):
        proc = run_cli(module, *args, f"hydra.run.dir={tmp_path / module}")
        assert proc.returncode == 2, proc.stderr[-1500:]
        assert "refusing to load" in error_line(proc) and "Traceback" not in proc.stderr
    with pytest.raises(UserError, match="refusing to load"):
        BudgetedVQA.from_run(run)
    assert not marker.exists()  # nothing ran
    assert BudgetedVQA.from_run(run_dir).controller.policy is not None  # the untouched run loads


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a GRPO controller checkpoint"),
    ("lookup_json", "refusing to load"),
    ("parquet", "refusing to load"),
    ("directory", "no checkpoint file"),
    ("old_format", "older lvlm_ctrl"),
])
def test_not_a_checkpoint_is_a_one_line_error(run_dir, tmp_path, kind, message):
    from lvlm_ctrl.controllers.grpo import load_policy

    good = run_dir / "checkpoints" / "best.ckpt"
    path = tmp_path / f"{kind}.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "lookup_json":
        path.write_text('{"format": "lvlm_ctrl.lookup_table/1", "tables": {}}')
    elif kind == "parquet":
        path.write_bytes(b"PAR1" + b"\0" * 64 + b"PAR1")
    elif kind == "directory":
        path.mkdir()
    else:  # written before the training options moved into GRPOModule's own hyperparameters
        ckpt = torch.load(good, weights_only=True)
        ckpt["hyper_parameters"].update(blocks_per_top_k=True, feasible_ms=[10.0, 40.0])
        del ckpt["serving"]
        torch.save(ckpt, path)
    with pytest.raises(UserError, match=message):
        load_policy(path)
    proc = run_cli("lvlm_ctrl.evaluate", "controller=grpo", f"ckpt={path}", "data.limit=2",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert proc.returncode == 2 and message in error_line(proc) and "Traceback" not in proc.stderr
    assert not (tmp_path / "eval" / "eval_summary.json").exists()


def test_restores_through_the_lightning_api(run_dir):
    """The documented way in: GRPOModule.load_from_checkpoint, weights_only, no prefix stripping."""
    from lvlm_ctrl.grpo.module import GRPOModule

    module = GRPOModule.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert module.serving["feasible_ms"][0] < module.serving["feasible_ms"][1]
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(module.policy.stage1[0].weight, state["policy.stage1.0.weight"])
