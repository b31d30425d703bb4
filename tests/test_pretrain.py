"""The pretraining recipe's parts that decide what the model sees: image labels and the curriculum."""

import torch

from lvlm_ctrl.data import easy_vqa
from lvlm_ctrl.pretrain import Curriculum, masked_ce


def test_image_attributes_agree_with_open_answers():
    samples = easy_vqa.load("train")
    attrs = easy_vqa.image_attributes(samples)
    assert len(attrs) == len({s.image_path for s in samples})
    for s in samples[:2000]:
        color, shape = attrs[s.image_path]
        if s.answers[0] in easy_vqa.COLORS:
            assert color == s.answers[0]
        if s.answers[0] in easy_vqa.SHAPES:
            assert shape == s.answers[0]
        if s.question in ("is there a red shape?", "is there a blue shape?") and color is not None:
            assert (color in s.question) == (s.answers[0] == "yes")
    known = sum(c is not None for c, _ in attrs.values()) / len(attrs)
    assert known > 0.8


def test_curriculum_starts_on_open_questions_then_covers_everything():
    open_idx = [1, 4, 7]
    sampler = Curriculum(open_idx, size=10, warm_samples=6, epochs=2, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 6 + 20
    assert set(order[:6]) <= set(open_idx)
    assert sorted(order[6:16]) == list(range(10)) == sorted(order[16:])
    assert order == list(Curriculum(open_idx, 10, 6, 2, seed=0))
    assert order != list(Curriculum(open_idx, 10, 6, 2, seed=1))


def test_masked_ce_is_zero_without_labels_and_keeps_gradients_finite():
    logits = torch.randn(4, 3, requires_grad=True)
    none = masked_ce(logits, torch.full((4,), -100))
    assert none.item() == 0.0
    some = masked_ce(logits, torch.tensor([0, -100, 2, -100]))
    (none + some).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
