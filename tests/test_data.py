import json

import pytest
from PIL import Image

from lvlm_ctrl.data import build_dataset
from lvlm_ctrl.errors import UserError


def make_vqav2(root, split="val", corrupt=False):
    (root / f"{split}2014").mkdir(parents=True)
    qs, anns = [], []
    for qid, img_id in [(11, 1), (12, 1), (21, 2)]:
        path = root / f"{split}2014" / f"COCO_{split}2014_{img_id:012d}.jpg"
        if corrupt and img_id == 2:
            path.write_bytes(b"not a jpeg")
        else:
            Image.new("RGB", (32, 24), (10 * img_id, 0, 0)).save(path)
        qs.append({"image_id": img_id, "question": f"what is {qid}?", "question_id": qid})
        anns.append({"question_id": qid, "image_id": img_id, "answer_type": "other", "question_type": "what",
                     "multiple_choice_answer": "two",
                     "answers": [{"answer": "two", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]})
    (root / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": qs}))
    (root / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    return root


def make_textvqa(root, split="val"):
    (root / "train_images").mkdir(parents=True)
    data = []
    for qid, img in [(1, "abc"), (2, "def")]:
        Image.new("RGB", (40, 40), (0, 99, 0)).save(root / "train_images" / f"{img}.jpg")
        data.append({"question": "what does the sign say?", "image_id": img, "question_id": qid,
                     "answers": ["stop"] * 8 + ["halt"] * 2, "set_name": split})
    (root / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps({"dataset_type": split, "data": data}))
    return root


def test_vqav2_fixture(tmp_path):
    ds = build_dataset("coco_2014_vqa", split="val", root=str(make_vqav2(tmp_path)))
    assert len(ds) == 3 and ds.name == "coco_2014_vqa"
    s = ds[2]
    assert s.sample_id == "21" and s.question == "what is 21?" and len(s.answers) == 10
    assert s.load_image().size == (32, 24)
    assert len(build_dataset("coco_2014_vqa", split="val", root=str(tmp_path), limit=2)) == 2


def test_textvqa_fixture(tmp_path):
    ds = build_dataset("text_vqa", split="val", root=str(make_textvqa(tmp_path)))
    assert [s.sample_id for s in ds.samples] == ["1", "2"]
    assert ds[0].answers.count("stop") == 8
    assert ds[1].load_image().mode == "RGB"


def test_easy_vqa_splits_are_disjoint_and_deterministic():
    train = build_dataset("easy_vqa", split="train")
    val = build_dataset("easy_vqa", split="val")
    test = build_dataset("easy_vqa", split="test")
    assert len(train) + len(val) == 38575 and len(test) == 9673
    assert not {s.image_path for s in train.samples} & {s.image_path for s in val.samples}
    assert [s.sample_id for s in build_dataset("easy_vqa", split="val", limit=5).samples] == \
        [s.sample_id for s in val.samples[:5]]


def test_bad_data_errors(tmp_path):
    with pytest.raises(UserError, match="VQAv2 questions not found"):
        build_dataset("coco_2014_vqa", split="val", root=str(tmp_path))
    (tmp_path / "TextVQA_0.5.1_val.json").write_text("{broken")
    with pytest.raises(UserError, match="not valid JSON"):
        build_dataset("text_vqa", split="val", root=str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset"):
        build_dataset("imagenet")
    with pytest.raises(UserError, match="unknown easy_vqa split"):
        build_dataset("easy_vqa", split="dev")
    bad = make_vqav2(tmp_path / "v", corrupt=True)
    with pytest.raises(UserError, match="unreadable image"):
        build_dataset("coco_2014_vqa", split="val", root=str(bad))[2].load_image()
