"""VQA datasets: each sample is an image, a question and the reference answers.

Every loader reads local files only. `build_dataset` is the Hydra target of conf/data/*.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lvlm_ctrl.errors import UserError


@dataclass(frozen=True)
class VQASample:
    sample_id: str
    image_path: str
    question: str
    answers: tuple[str, ...]

    def load_image(self) -> Image.Image:
        return load_image(self.image_path)

    def image_size(self) -> tuple[int, int]:
        """(width, height) from the file's header, without decoding the image."""
        try:
            with Image.open(self.image_path) as img:
                return img.size
        except (FileNotFoundError, UnidentifiedImageError, OSError):
            return load_image(self.image_path).size  # the same one-line error as loading it


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}; check the dataset root / image path") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"unreadable image {path} ({err.__class__.__name__}); replace or remove the file") from None


def size_class(width: int, height: int) -> str:
    """small / medium / large by pixel count: what a controller knows of an image before encoding it."""
    pixels = width * height
    return "small" if pixels < 192 * 192 else "medium" if pixels < 384 * 384 else "large"


def question_family(sample_id: str) -> str:
    """The question family a sample id names (synth_vqa: `test-00042-digit`), else "any"."""
    from lvlm_ctrl.data.synth_vqa import FAMILIES

    tail = str(sample_id).rsplit("-", 1)[-1]
    return tail if tail in FAMILIES else "any"


def input_group(sample_id: str, size: tuple[int, int], by: str | None) -> str | None:
    """The group of inputs a controller can tell apart before deciding: `by` = size (the image's size
    class), family (the question's family) or family_size (both); None = one group."""
    if not by:
        return None
    if by not in ("size", "family", "family_size"):
        raise UserError(f"group_by={by!r}: choose size, family, family_size or null")
    parts = ([question_family(sample_id)] if "family" in by else []) + ([size_class(*size)] if "size" in by else [])
    return "/".join(parts)


class VQADataset:
    """A list of samples with a name and split; indexable, so it also serves a torch DataLoader."""

    def __init__(self, name: str, split: str, samples: list[VQASample]):
        self.name, self.split, self.samples = name, split, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> VQASample:
        return self.samples[i]


def build_dataset(name: str, split: str = "test", limit: int | None = None, root: str | None = None,
                  seed: int = 0) -> VQADataset:
    from functools import partial

    from lvlm_ctrl.data import easy_vqa, synth_vqa, textvqa, vqav2

    loaders = {"easy_vqa": easy_vqa.load, "coco_2014_vqa": vqav2.load, "text_vqa": textvqa.load,
               "synth_vqa": partial(synth_vqa.load, seed=seed)}
    if name not in loaders:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(loaders)}")
    if limit is not None and (isinstance(limit, bool) or not str(limit).isdigit() or int(limit) <= 0):
        raise UserError(f"data.limit={limit!r}: give a positive whole number of samples, or null for the whole split")
    samples = loaders[name](split=split, root=root)
    if limit is not None:
        samples = samples[: int(limit)]
    if not samples:
        raise UserError(f"dataset {name} split {split} has no samples; check data.root and data.split")
    return VQADataset(name, split, samples)
