"""The whole pipeline on a real MoE VLM family, through the CLIs a user runs: profile -> latency model
-> lookup -> GRPO train -> evaluate -> infer, on the tiny random Qwen3-VL-MoE of build_tiny."""

import json

import pytest

from tests.conftest import run_cli


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_the_pipeline_runs_on_qwen3_vl_moe(tmp_path, tiny_checkpoints, easy_samples):
    model = ["model=qwen3_vl_moe", f"model.path={tiny_checkpoints('qwen3_vl_moe')}"]
    prof = tmp_path / "profile"
    ok(run_cli("lvlm_ctrl.profile", *model, "data.split=val", "data.limit=6", f"profile.path={prof}",
               "profile.warmup=1", f"hydra.run.dir={tmp_path / 'p'}"))
    ok(run_cli("lvlm_ctrl.latency_model", f"profile.path={prof}", "held_out=0.5", f"hydra.run.dir={tmp_path / 'lm'}"))
    assert (tmp_path / "lm" / "latency_model.json").exists()
    ok(run_cli("lvlm_ctrl.train", "controller=lookup", *model, f"profile.path={prof}", "data.split=val",
               "data.limit=6", f"hydra.run.dir={tmp_path / 'lookup'}"))
    table = tmp_path / "lookup" / "lookup_table.json"
    ok(run_cli("lvlm_ctrl.train", "controller=grpo", "budget=uniform", *model, f"profile.path={prof}",
               "data.limit=6", "profile.val_fraction=0.5", "trainer.max_steps=4", "trainer.val_check_interval=2", "profile.batch_size=2",
               "controller.group_size=4", "logger=csv", f"hydra.run.dir={tmp_path / 'grpo'}"))
    ckpt = tmp_path / "grpo" / "checkpoints" / "best.ckpt"
    for name, args in (("lookup", ["controller=lookup", f"controller.table={table}"]),
                       ("grpo", ["controller=grpo", f"ckpt={ckpt}"])):
        ok(run_cli("lvlm_ctrl.evaluate", *args, *model, "data.limit=2", "eval.num_budgets=2",
                   f"hydra.run.dir={tmp_path / ('eval_' + name)}"))
        summary = json.loads((tmp_path / f"eval_{name}" / "eval_summary.json").read_text())
        assert summary["backbone"] == "qwen3_vl_moe" and len(summary["results"]) == 2
    proc = ok(run_cli("lvlm_ctrl.infer", f"ckpt={ckpt}", *model, f"image={easy_samples[0].image_path}",
                      "question=what color is the shape?", "budget_ms=1000", f"hydra.run.dir={tmp_path / 'infer'}"))
    assert "tier" in proc.stdout
