import pytest
import torch

from lvlm_ctrl.metrics import VQAAccuracy, normalize_answer, vqa_score


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"),
    ("the dog", "dog"),
    ("A red ball.", "red ball"),
    ("dont", "don't"),
    ("yes!", "yes"),
    ("1,000", "1000"),
    ("  Circle\n", "circle"),
    ("black-and-white", "black and white"),
])
def test_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_single_answer_is_normalised_exact_match():
    assert vqa_score("Circle", ["circle"]) == 1.0
    assert vqa_score("the circle.", ["circle"]) == 1.0
    assert vqa_score("square", ["circle"]) == 0.0


def test_ten_answers_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    # each leave-one-out subset holds 2 or 3 matches of "2": (3 subsets x 2/3 + 7 subsets x 1) / 10
    assert vqa_score("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_score("3", answers) == 1.0
    assert vqa_score("4", answers) == 0.0
    one = ["yes"] + ["no"] * 9
    assert vqa_score("yes", one) == pytest.approx(9 * (1 / 3) / 10)


def test_torchmetric_accumulates():
    metric = VQAAccuracy()
    metric.update(["circle", "red"], [["circle"], ["blue"]])
    metric.update(["2"], [["two"] * 10])
    assert metric.compute().item() == pytest.approx(2 / 3)
    metric.reset()
    assert metric.compute().item() == 0.0
    assert isinstance(metric.compute(), torch.Tensor)
