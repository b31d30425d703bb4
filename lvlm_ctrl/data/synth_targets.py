"""What synth-VQA's generator knows and a real dataset would not, as targets for training-only probes
(pretrain_vlm.py): the scene under each merged vision token, and which tokens a question is about.

A tiny decoder trained from the answers alone learns to read the image far too slowly for this
machine (0.26-0.32 exact match after 1,200 joint steps, yes/no at chance); these probes give every
token of every sample a direct signal. Tokens are the vision encoder's output, in raster order over
the (h / merge) x (w / merge) grid of the resized image.
"""

from __future__ import annotations

import torch

from lvlm_ctrl.data import synth_vqa

SCENE_CLASSES = (len(synth_vqa.COLORS) + 1, len(synth_vqa.SHAPES) + 1, 10)  # colour, shape (+ none), digit
# the image's facts, in scene_facts' order: which colours it shows (a flag per colour), then one class
# each for its count of objects, the biggest one's colour, the objects' shape, the digit
FACT_CLASSES = {"shown": len(synth_vqa.COLORS), "count": 5, "biggest": len(synth_vqa.COLORS),
                "shape": len(synth_vqa.SHAPES), "digit": 10}


def token_centres(scene, grid_h: int, grid_w: int, merge: int = 2):
    """(x, y) in the scene's pixels of each merged token's centre, and the grid's (rows, cols)."""
    rows, cols = grid_h // merge, grid_w // merge
    ys = (torch.arange(rows) + 0.5) * scene.height / rows
    xs = (torch.arange(cols) + 0.5) * scene.width / cols
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return x, y, rows, cols


def _cell(scene, x: float, y: float, rows: int, cols: int) -> tuple[int, int]:
    """The token holding the scene point (x, y)."""
    return min(int(y / scene.height * rows), rows - 1), min(int(x / scene.width * cols), cols - 1)


def scene_labels(seed: int, merge: int = 2):
    """-> labels(image_path, grid_h, grid_w): per token, the colour and shape of the object at its
    centre (or none), the digit at the token holding the box's centre (-100 elsewhere), which object
    (its index, or -1) the token shows (inside it, or holding its centre) and that object's shape.
    The last two let a probe pool an object's tokens: inside a large object a token is one flat
    colour, and the shape is only in the outline the object's tokens see together."""
    colour_idx = {c: i for i, c in enumerate(synth_vqa.COLORS)}
    shape_idx = {c: i for i, c in enumerate(synth_vqa.SHAPES)}

    def labels(image_path: str, grid_h: int, grid_w: int) -> torch.Tensor:
        scene = synth_vqa.scene_of(image_path, seed)
        x, y, rows, cols = token_centres(scene, grid_h, grid_w, merge)
        colour = torch.full((rows, cols), len(colour_idx))
        shape = torch.full((rows, cols), len(shape_idx))
        obj, obj_shape = torch.full((rows, cols), -1), torch.full((rows, cols), -100)
        for i, (c, sh, cx, cy, r) in enumerate(scene.objects):
            inside = synth_vqa.inside(sh, x - cx, y - cy, 0.9 * r)  # a margin: edges blur when resized
            colour[inside], shape[inside] = colour_idx[c], shape_idx[sh]
            shows = synth_vqa.inside(sh, x - cx, y - cy, r + 0.5 * scene.width / cols)  # and its outline's tokens
            shows[_cell(scene, cx, cy, rows, cols)] = True
            obj[shows], obj_shape[shows] = i, shape_idx[sh]
        digit = torch.full((rows, cols), -100)
        x0, y0, side = scene.box
        digit[_cell(scene, x0 + side / 2, y0 + side / 2, rows, cols)] = scene.digit
        return torch.stack([colour.flatten(), shape.flatten(), digit.flatten(), obj.flatten(), obj_shape.flatten()], dim=-1)
    return labels


def asked(scene, question: str) -> list[int] | str:
    """The objects (indices, left to right) a synth-VQA question is about, or "box" for the digit."""
    q = question.rstrip("?")
    objects = scene.objects
    if q in ("what number is written in the box", "is the number in the box bigger than four"):
        return "box"
    if q == "what color is the biggest shape":
        return [objects.index(scene.biggest())]
    if q in ("what shape are the objects", "how many shapes are there", "what colors are the shapes in rainbow order"):
        return list(range(len(objects)))
    raise ValueError(f"not a synth-VQA question: {question!r}")


def question_labels(seed: int, merge: int = 2):
    """-> labels(image_path, question, grid_h, grid_w): per token, 1.0 where it shows what the
    question is about (inside an asked object or the digit's box, or the token holding its centre,
    so that a small object at a low tier still has one), else 0.0."""

    def labels(image_path: str, question: str, grid_h: int, grid_w: int) -> torch.Tensor:
        scene = synth_vqa.scene_of(image_path, seed)
        x, y, rows, cols = token_centres(scene, grid_h, grid_w, merge)
        target = torch.zeros(rows, cols)
        picks = asked(scene, question)
        if picks == "box":
            x0, y0, side = scene.box
            target[(x >= x0) & (x <= x0 + side) & (y >= y0) & (y <= y0 + side)] = 1.0
            target[_cell(scene, x0 + side / 2, y0 + side / 2, rows, cols)] = 1.0
        else:
            for i in picks:
                _, sh, cx, cy, r = scene.objects[i]
                target[synth_vqa.inside(sh, x - cx, y - cy, r)] = 1.0
                target[_cell(scene, cx, cy, rows, cols)] = 1.0
        return target.flatten()
    return labels


def scene_facts(seed: int):
    """-> facts(image_path): what every question family's answer is made of (FACT_CLASSES), for a
    probe on the decoder's last prompt token. The answers need the scene gathered from many image
    tokens into one (the count and the colours shown above all), which the answers alone taught
    slowly (README, synth-VQA testbed)."""
    colour_idx = {c: i for i, c in enumerate(synth_vqa.COLORS)}

    def facts(image_path: str) -> torch.Tensor:
        scene = synth_vqa.scene_of(image_path, seed)
        shown = torch.zeros(len(colour_idx), dtype=torch.long)
        shown[[colour_idx[o[0]] for o in scene.objects]] = 1
        return torch.cat([shown, torch.tensor([len(scene.objects), colour_idx[scene.biggest()[0]],
                                               synth_vqa.SHAPES.index(scene.objects[0][1]), scene.digit])])
    return facts
