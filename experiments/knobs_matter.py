"""Do the knobs matter? The full and the cheapest configuration of the embedded default, side by side.

    python experiments/knobs_matter.py [N]      # N easy-VQA test questions, default 2000

Runs `lvlm_ctrl.evaluate controller=static` twice (measured latency, batch 1, after warm-up) and
writes outputs/experiments/knobs_matter.json: both rows, the median-latency speed-up and the
accuracy gap, with the commands and the machine. Run it alone: two cores shared skew latency.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lvlm_ctrl.io import atomic_write_json, machine

CONFIGS = {
    "full": [],
    "cheapest": ["controller.tier=low", "controller.insertion=1", "controller.top_k=4", "controller.num_blocks=12"],
}


def main(limit: int = 2000) -> dict:
    out = ROOT / "outputs" / "experiments" / "knobs_matter"
    rows = {}
    for name, overrides in CONFIGS.items():
        cmd = [sys.executable, "-m", "lvlm_ctrl.evaluate", "controller=static", "data.split=test",
               f"data.limit={limit}", f"hydra.run.dir={out / name}", *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True)
        summary = json.loads((out / name / "eval_summary.json").read_text())
        rows[name] = {"command": " ".join(["python"] + cmd[1:]), **summary["results"][0]}
    full, cheap = rows["full"], rows["cheapest"]
    report = {
        "num_samples": limit,
        "rows": rows,
        "speedup_median": round(full["median_latency_ms"] / cheap["median_latency_ms"], 3),
        "accuracy_gap_points": round(100 * (full["accuracy"] - cheap["accuracy"]), 2),
        "targets": {"speedup_median": ">= 1.5", "accuracy_gap_points": ">= 10"},
        "machine": machine(),
    }
    atomic_write_json(out.with_suffix(".json"), report)
    print(json.dumps({k: report[k] for k in ("speedup_median", "accuracy_gap_points")}))
    return report


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
