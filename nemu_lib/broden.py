"""Broden, Network Dissection's original concept data set (Bau et al., CVPR 2017), for online users.

Broden merges pixel-wise labels of colours, objects, parts, materials, scenes and textures from several data
sets into one folder (``broden1_224``: ``index.csv``, ``label.csv``, ``images/``). It needs a ~1 GB download
once; :func:`load_broden` downloads nothing and, without the folder, says what to fetch and where to put it.
A ``DataLoader`` over it feeds :func:`nemu_lib.dissection.dissect`; offline, the Shapes scenes carry
pixel-wise concepts instead (:func:`nemu_lib.data.concept_masks`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import data_dir
from .real_data import DatasetUnavailableError

BRODEN_URL = "http://netdissect.csail.mit.edu/data/broden1_224.zip"  # ~1 GB; unpacks to broden1_224/
BRODEN_CATEGORIES = ("color", "object", "part", "material", "scene", "texture")


class BrodenScenes(torch.utils.data.Dataset):
    """Broden (Bau et al. 2017) from an unpacked ``broden1_224`` folder, for :func:`dissect` via a DataLoader.

    Items ``(image (3, 224, 224) in [0, 1] (``transform`` normalises it), masks (C, 112, 112) bool)`` for the
    concepts of ``categories`` labelled in at least ``min_frequency`` images (``concept_names``); scene and
    texture labels cover the whole image, as in the paper. Masks take C × 112² bytes per image (C ≈ 1,200).
    """

    def __init__(self, root: str | Path, split: str = "train", categories: Sequence[str] = BRODEN_CATEGORIES,
                 min_frequency: int = 10, transform=None) -> None:
        self.root, self.transform, self.categories = Path(root), transform, tuple(categories)
        with open(self.root / "label.csv", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["number"]) > 0]  # 0: unlabelled
        self.lut = np.full(max(int(r["number"]) for r in rows) + 1, -1)  # label number -> mask channel
        self.concept_names = []
        for r in rows:  # a label's category is the one it occurs in most: "color(12);object(3)"
            cats = dict(c.rstrip(")").split("(") for c in r["category"].split(";") if "(" in c)
            cat = max(cats, key=lambda c: int(cats[c]), default=None)
            if cat in self.categories and int(r["frequency"] or 0) >= min_frequency:
                self.lut[int(r["number"])] = len(self.concept_names)
                self.concept_names.append(f"{cat}/{r['name']}")
        with open(self.root / "index.csv", encoding="utf-8") as f:
            self.index = [r for r in csv.DictReader(f) if r["split"] == split]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from PIL import Image

        def read(name: str) -> np.ndarray:  # (H, W, 3) uint8
            return np.asarray(Image.open(self.root / "images" / name).convert("RGB"))

        row = self.index[i]
        image = torch.from_numpy(read(row["image"]).copy()).permute(2, 0, 1).float() / 255
        masks = np.zeros((len(self.concept_names), int(row["sh"]), int(row["sw"])), dtype=bool)
        for item in (it for cat in self.categories for it in row[cat].split(";") if it):
            # an image-level label number (scene, texture), or a segmentation PNG: label = R + 256 G
            seg = np.full(masks.shape[1:], int(item)) if item.isdigit() else read(item)[..., :2].astype(int) @ [1, 256]
            channel = self.lut[np.clip(seg, 0, len(self.lut) - 1)]
            yy, xx = np.nonzero(channel >= 0)
            masks[channel[yy, xx], yy, xx] = True
        return (self.transform(image) if self.transform else image), torch.from_numpy(masks)


def load_broden(root: str | Path | None = None, **kwargs) -> BrodenScenes:
    """Broden from ``root`` (default ``data_dir() / "broden1_224"``); keyword arguments go to :class:`BrodenScenes`.

    Nothing is downloaded here; without the folder, raises :class:`~nemu_lib.real_data.DatasetUnavailableError`
    that says what to fetch and where to unpack it.
    """
    root = Path(root) if root is not None else data_dir() / "broden1_224"
    if not (root / "index.csv").exists():
        raise DatasetUnavailableError(
            f"Broden is not in {root} (no index.csv). It needs internet once: download {BRODEN_URL} (~1 GB) "
            f"and unzip it into {root.parent} so that {root / 'index.csv'} exists, or pass root=. Offline, the "
            "Shapes scenes carry pixel-wise concepts (shape, colour, texture, background): "
            "nemu_lib.data.concept_masks"
        )
    return BrodenScenes(root, **kwargs)
