"""easy-VQA from the `easy-vqa` PyPI package (64x64 shapes, one answer per question).

Splits: test is the official test set; val holds every question on train images whose id is a
multiple of 10 (so no val image is seen in training), train the rest.
"""

from __future__ import annotations

from lvlm_ctrl.data import VQASample
from lvlm_ctrl.errors import UserError

SPLITS = ("train", "val", "test")


def load(split: str, root: str | None = None) -> list[VQASample]:
    import easy_vqa

    if split not in SPLITS:
        raise UserError(f"unknown easy_vqa split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    samples = []
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids)):
        if split != "test" and (img % 10 == 0) != (split == "val"):
            continue
        samples.append(VQASample(f"{split}-{i}", paths[img], q, (a,)))
    return samples


def vocabulary() -> list[str]:
    """Every question and answer string, so a tokenizer covers the dataset."""
    import easy_vqa

    return easy_vqa.get_train_questions()[0] + easy_vqa.get_test_questions()[0] + easy_vqa.get_answers()


SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def image_attributes(samples: list[VQASample]) -> dict[str, tuple[str | None, str | None]]:
    """(colour, shape) of each image, as far as its questions tell: open questions name them."""
    found: dict[str, list] = {}
    for s in samples:
        found.setdefault(s.image_path, [None, None])
        answer = s.answers[0]
        if answer in COLORS:
            found[s.image_path][0] = answer
        elif answer in SHAPES:  # "what is the red shape?" names the colour too
            found[s.image_path][1] = answer
            named = [w for w in s.question.rstrip("?").split() if w in COLORS]
            if named:
                found[s.image_path][0] = named[0]
    return {path: tuple(v) for path, v in found.items()}


def answers() -> list[str]:
    import easy_vqa

    return easy_vqa.get_answers()
