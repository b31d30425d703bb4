"""synth-VQA: generated deterministically, inputs that differ in size, every question family answerable."""

import hashlib
from collections import Counter

from PIL import Image

from lvlm_ctrl.data import build_dataset
from lvlm_ctrl.data import question_family as family_of
from lvlm_ctrl.data.synth_vqa import FAMILIES, generate, vocabulary
from lvlm_ctrl.metrics import vqa_score


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_same_seed_same_dataset_other_seed_other(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(tmp_path / name / "val", "val", seed, images=12)
    a, b, c = (build_dataset("synth_vqa", split="val", root=str(tmp_path / n)).samples for n in "abc")
    assert [(s.sample_id, s.question, s.answers) for s in a] == [(s.sample_id, s.question, s.answers) for s in b]
    assert [digest(s.image_path) for s in a] == [digest(s.image_path) for s in b]
    assert [digest(s.image_path) for s in a] != [digest(s.image_path) for s in c]


def test_inputs_differ_and_every_family_is_asked(tmp_path):
    generate(tmp_path / "test", "test", 0, images=40)
    samples = build_dataset("synth_vqa", split="test", root=str(tmp_path)).samples
    assert len(samples) == 120
    families = Counter(family_of(s.sample_id) for s in samples)
    assert set(families) == set(FAMILIES) and max(families.values()) - min(families.values()) <= 1
    sizes = {Image.open(s.image_path).size for s in samples}
    pixels = sorted(w * h for w, h in sizes)
    assert len(sizes) >= 15 and pixels[-1] >= 4 * pixels[0]  # many sizes, a wide spread of vision tokens
    assert any(w > h for w, h in sizes) and any(h > w for w, h in sizes)
    lengths = {len(s.answers[0].split()) for s in samples if family_of(s.sample_id) == "order"}
    assert lengths >= {2, 3}  # answers of several lengths
    words = set(vocabulary())
    for s in samples:
        assert set(s.question.rstrip("?").split()) <= words
        assert vqa_score(s.answers[0], list(s.answers)) == 1.0


def test_answers_match_the_drawn_scene(tmp_path):
    """A colour question's answer is the colour drawn on the most pixels; the order family names
    every colour drawn, in rainbow order; a digit answer is the single digit drawn and a yes/no
    answer says whether it is over four (asked of a 4 and of a 5)."""
    from lvlm_ctrl.data.synth_vqa import COLORS, NUMBER_WORDS, scene_of

    generate(tmp_path / "val", "val", 0, images=60)
    yes_no = set()
    for s in build_dataset("synth_vqa", split="val", root=str(tmp_path)).samples:
        family = family_of(s.sample_id)
        pixels = Counter(Image.open(s.image_path).convert("RGB").getdata())
        drawn = [c for c, rgb in COLORS.items() if pixels[rgb] > 0]
        if family == "colour":
            assert max(drawn, key=lambda c: pixels[COLORS[c]]) == s.answers[0]
        elif family == "order":
            assert s.answers[0] == " ".join(drawn)
        elif family == "yesno":
            assert s.answers[0] == ("yes" if scene_of(s.image_path).digit > 4 else "no")
            yes_no.add(scene_of(s.image_path).digit)
        elif family == "digit":
            assert s.answers[0] == str(scene_of(s.image_path).digit)
            assert vqa_score(NUMBER_WORDS[int(s.answers[0])], list(s.answers)) == 1.0
    assert {4, 5} <= yes_no  # either side of the line was asked


def test_a_split_of_another_grammar_is_generated_again(tmp_path, monkeypatch):
    """A split written by an earlier question grammar (a manifest without this one's number) is
    written again on load, not served with questions the backbone was not trained on."""
    import json

    from lvlm_ctrl.data import synth_vqa

    monkeypatch.setitem(synth_vqa.SPLITS, "val", 4)
    generate(tmp_path / "val", "val", 0)
    manifest = tmp_path / "val" / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["grammar"]
    old["samples"][0]["question"] = "what color is the triangle on the left?"
    manifest.write_text(json.dumps(old))
    samples = synth_vqa.load("val", root=str(tmp_path))
    assert samples[0].question == "what color is the biggest shape?"
    assert json.loads(manifest.read_text())["grammar"] == synth_vqa.GRAMMAR


def test_a_corrupt_manifest_is_a_one_line_error_and_stays(tmp_path):
    """A manifest that does not parse, or is not one, names the file and the fix; it is not
    overwritten (the grammar check must not take it for an old grammar)."""
    import pytest

    from lvlm_ctrl.data import synth_vqa
    from lvlm_ctrl.errors import UserError

    (tmp_path / "val").mkdir()
    manifest = tmp_path / "val" / "manifest.json"
    for text in ("{", "[1, 2]", '{"grammar": 2}'):
        manifest.write_text(text)
        with pytest.raises(UserError, match=r"manifest.json is corrupt .*delete .* and it is generated again"):
            synth_vqa.load("val", root=str(tmp_path))
        assert manifest.read_text() == text
