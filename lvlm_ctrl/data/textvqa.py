"""TextVQA (dataset name text_vqa) from the official TextVQA_0.5.1_<split>.json and image folders."""

from __future__ import annotations

from pathlib import Path

from lvlm_ctrl.data import VQASample
from lvlm_ctrl.data.vqav2 import read_json
from lvlm_ctrl.errors import UserError


def load(split: str, root: str | None = None) -> list[VQASample]:
    root = Path(root or "data/textvqa")
    data = read_json(root / f"TextVQA_0.5.1_{split}.json", "TextVQA annotations")
    images = root / ("test_images" if split == "test" else "train_images")  # val images live with train
    try:
        return [
            VQASample(str(d["question_id"]), str(images / f"{d['image_id']}.jpg"), d["question"],
                      tuple(d.get("answers", ())))
            for d in data["data"]
        ]
    except (KeyError, TypeError) as err:
        raise UserError(f"TextVQA file under {root} does not follow the official format (missing {err})") from None
