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
