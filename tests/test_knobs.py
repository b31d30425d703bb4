import pytest
import torch

from lvlm_ctrl.errors import UserError
from lvlm_ctrl.knobs import Knobs, KnobSpace


def test_space_has_225_configurations_as_designed():
    space = KnobSpace()
    configs = space.configurations()
    assert len(configs) == 225 == len(set(configs))
    assert {p: space.num_blocks_options(p) for p in space.insertions} == {
        1: [12, 13, 14, 15, 16], 2: [13, 14, 15, 16], 3: [14, 15, 16], 4: [15, 16], 5: [16]}
    assert space.full() == Knobs("high", 1, 8, 16)
    assert space.cheapest() == Knobs("low", 1, 4, 12)


def test_num_blocks_mask_matches_options():
    space = KnobSpace()
    mask = space.num_blocks_mask(torch.tensor([1, 2, 3, 4, 5]))
    assert mask.shape == (5, space.max_block_options)
    for row, p in zip(mask, space.insertions):
        assert int(row.sum()) == len(space.num_blocks_options(p))
        assert row[: len(space.num_blocks_options(p))].all()


def test_general_space_ranges():
    space = KnobSpace(num_layers=24, insertions=(1, 2, 3))
    assert space.num_blocks_options(1) == [22, 23, 24]
    assert space.num_blocks_options(3) == [24]


@pytest.mark.parametrize("args, message", [
    (("ultra", 1, 8, 16), "unknown tier"),
    (("high", 0, 8, 16), "insertion 0"),
    (("high", 1, 9, 16), "top_k 9"),
    (("high", 3, 8, 13), "num_blocks 13 is invalid at insertion 3"),
    (("high", "x", 8, 16), "insertion must be an integer"),
])
def test_parse_rejects_bad_knobs(args, message):
    with pytest.raises(UserError, match=message):
        KnobSpace().parse(*args)
