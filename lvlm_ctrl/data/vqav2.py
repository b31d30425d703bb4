"""VQAv2 (dataset name coco_2014_vqa) from the official JSON files and the COCO 2014 images."""

from __future__ import annotations

import json
from pathlib import Path

from lvlm_ctrl.data import VQASample
from lvlm_ctrl.errors import UserError


def read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise UserError(f"{what} not found at {path}; point data.root at the directory that holds it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{what} at {path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def load(split: str, root: str | None = None) -> list[VQASample]:
    root = Path(root or "data/vqav2")
    questions = read_json(root / f"v2_OpenEnded_mscoco_{split}2014_questions.json", "VQAv2 questions")
    annotations = read_json(root / f"v2_mscoco_{split}2014_annotations.json", "VQAv2 annotations")
    try:
        answers = {a["question_id"]: tuple(x["answer"] for x in a["answers"]) for a in annotations["annotations"]}
        samples = [
            VQASample(str(q["question_id"]), str(root / f"{split}2014" / f"COCO_{split}2014_{q['image_id']:012d}.jpg"),
                      q["question"], answers[q["question_id"]])
            for q in questions["questions"]
        ]
    except (KeyError, TypeError) as err:
        raise UserError(f"VQAv2 files under {root} do not follow the official format (missing {err})") from None
    return samples
