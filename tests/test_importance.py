import json

from lvlm_ctrl.backbone import load_ranking
from lvlm_ctrl.importance import block_influence, rank
from tests.conftest import run_cli


def test_rank_keeps_block_zero_first():
    assert rank([0.0, 0.1, 0.9, 0.5]) == [0, 2, 3, 1]


def test_block_influence_is_measured_per_block(backbone, easy_samples):
    bi = block_influence(backbone, easy_samples[:8], batch_size=4)
    assert len(bi) == backbone.hooks.num_layers
    assert all(0.0 <= v <= 2.0 for v in bi) and len(set(bi)) > 1


def test_importance_cli_writes_a_ranking(tmp_path):
    proc = run_cli("lvlm_ctrl.importance", "data.limit=8", "method=accuracy_drop", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "importance.json").read_text())
    assert sorted(result["ranking"]) == list(range(16)) and result["ranking"][0] == 0
    assert len(result["accuracy_drop"]) == 16 and result["accuracy_drop"][0] is None
    assert load_ranking(tmp_path / "importance.json", 16) == result["ranking"]


def test_malformed_importance_file_is_rejected(tmp_path):
    bad = tmp_path / "importance.json"
    bad.write_text(json.dumps({"ranking": [0, 1, 1]}))
    proc = run_cli("lvlm_ctrl.evaluate", "data.limit=2", f"model.importance={bad}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "does not rank blocks 0..15" in proc.stderr
