"""Data: the embedded synthetic Shapes scenes, their splits, normalisation and mosaics.

``ShapesScenes`` draws procedural scenes that need no files and no internet: a textured or smooth
background with clutter, one *main* object on top and up to two smaller distractors. Each scene is a pure
function of ``(seed, global index)``, so any sample can be regenerated anywhere, and it carries its own
ground truth: the main object's mask (for locality metrics), instance masks, per-pixel concept maps
(shape, colour, texture, background: for Network Dissection, Bau et al. CVPR 2017), the main object's
shape class (for a supervised baseline) and its keypoints (centre and corners).

Images are float ``(3, H, W)`` in [0, 1]; models take them normalised with :func:`normalize` (the data
set's mean and std), so that a masked-out pixel (value 0 after normalisation) equals the data set mean.
Real data sets (STL10, Imagenette, VOC) are in :mod:`nemu_lib.real_data`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .config import Profile, get_profile
from .progress import tqdm

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "magenta": (0.85, 0.20, 0.80),
    "cyan": (0.15, 0.80, 0.85),
}
TEXTURES = ("solid", "stripes", "dots")
BACKGROUNDS = ("gradient", "waves", "checker")
CONCEPT_CATEGORIES = {"shape": SHAPES, "colour": tuple(COLOURS), "texture": TEXTURES, "background": BACKGROUNDS}
MAX_OBJECTS = 3  # main object + up to two distractors
NUM_KEYPOINTS = 7  # centre + up to six corners / tips
SPLIT_OFFSETS = {"train": 0, "val": 10_000_000, "test": 20_000_000}  # global index = offset + local index
MAX_SPLIT_SIZE = 10_000_000

# Per-channel statistics of the training split at 64 px (measured over 20,000 scenes; tests re-measure).
SHAPES_MEAN = (0.4509, 0.4488, 0.4495)
SHAPES_STD = (0.1963, 0.1783, 0.1926)


def _polygon(n: int, radii: tuple[float, ...] = (1.0,), start: float = np.pi / 2) -> np.ndarray:
    """Vertices ``(n * len(radii), 2)`` of a regular polygon (or star when two radii alternate)."""
    k = n * len(radii)
    angles = start + 2 * np.pi * np.arange(k) / k
    r = np.resize(np.asarray(radii), k)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


_W = 0.36  # half-width of the cross's arms
_VERTICES: dict[str, np.ndarray | None] = {
    "circle": None,
    "square": _polygon(4, start=np.pi / 4),
    "triangle": _polygon(3),
    "star": _polygon(5, radii=(1.0, 0.45)),
    "cross": np.array(
        [(_W, 1), (_W, _W), (1, _W), (1, -_W), (_W, -_W), (_W, -1), (-_W, -1), (-_W, -_W), (-1, -_W),
         (-1, _W), (-_W, _W), (-_W, 1)],
        dtype=float,
    ),
    "hexagon": _polygon(6),
}
# Keypoints beyond the centre, in the shape's own unit coordinates: corners, tips or arm ends.
_TIPS: dict[str, np.ndarray] = {
    "circle": np.zeros((0, 2)),
    "square": _VERTICES["square"],
    "triangle": _VERTICES["triangle"],
    "star": _VERTICES["star"][::2],
    "cross": np.array([(0, 1), (1, 0), (0, -1), (-1, 0)], dtype=float),
    "hexagon": _VERTICES["hexagon"],
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points ``(u, v)`` lie inside the polygon, vectorised over points."""
    inside = np.zeros(u.shape, dtype=bool)
    for (xi, yi), (xj, yj) in zip(vertices, np.roll(vertices, 1, axis=0), strict=True):
        crosses = (yi > v) != (yj > v)
        x_at = (xj - xi) * (v - yi) / (yj - yi + 1e-12) + xi
        inside ^= crosses & (u < x_at)
    return inside


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> tuple[int, np.ndarray]:
    """A background type and its image ``(H, W, 3)``: two dull colours blended by a pattern."""
    kind = int(rng.integers(len(BACKGROUNDS)))
    c0, c1 = rng.uniform(0.15, 0.75, size=(2, 3))
    if BACKGROUNDS[kind] == "gradient":
        phi = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(phi) + yy * np.sin(phi)
        t = (t - t.min()) / (t.max() - t.min() + 1e-8)
    elif BACKGROUNDS[kind] == "waves":
        t = np.zeros_like(xx)
        for _ in range(3):
            fx, fy = rng.uniform(-9, 9, size=2)
            t += np.sin(fx * xx + fy * yy + rng.uniform(0, 2 * np.pi)) / 3
        t = 0.5 + 0.5 * t
    else:  # checker, low contrast
        n = rng.integers(4, 9)
        t = 0.35 * ((np.floor(xx * n) + np.floor(yy * n)) % 2)
    return kind, c0 * (1 - t[..., None]) + c1 * t[..., None]


def _clutter(rng: np.random.Generator, image: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> None:
    """Draw 2-5 thin line segments in dull colours onto the background, in place."""
    for _ in range(rng.integers(2, 6)):
        a, b = rng.uniform(0, 1, size=(2, 2))
        d = b - a
        t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / (d @ d + 1e-8), 0, 1)
        dist = np.hypot(xx - a[0] - t * d[0], yy - a[1] - t * d[1])
        image[dist < rng.uniform(0.008, 0.02)] = rng.uniform(0.1, 0.8, size=3)


# Version of the scene generator below (render_scene and its helpers). Bump it whenever the rendering changes
# (any pixel, mask, label or keypoint, or the random draws): the disk cache of rendered splits
# (nemu_lib.scene_cache) is keyed by it, so stale files are rendered again instead of read.
GENERATOR_VERSION = 1


def render_scene(seed: int, index: int, image_size: int = 64) -> dict[str, np.ndarray]:
    """Draw scene ``index`` of the stream ``seed`` (pure function of its arguments).

    Returns NumPy arrays: ``image (3, H, W)`` float32 in [0, 1]; ``object_mask (H, W)`` bool;
    ``instance_masks (MAX_OBJECTS, H, W)`` bool, main object first; ``concepts (4, H, W)`` uint8 with one
    plane per category of :data:`CONCEPT_CATEGORIES` (0 = absent, k + 1 = concept k); ``label`` (main
    object's shape); ``keypoints (NUM_KEYPOINTS, 2)`` float32 (x, y) in pixels and ``keypoint_valid``.
    """
    if not 16 <= image_size <= 512:
        raise ValueError(f"image_size must be between 16 and 512 px, got {image_size}")
    rng = np.random.default_rng([seed, index])
    size = image_size
    coords = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # (H, W) unit coordinates of pixel centres

    bg_kind, image = _background(rng, xx, yy)
    _clutter(rng, image, xx, yy)
    owner = np.full((size, size), -1, dtype=np.int64)  # which object each pixel shows (-1 background)
    concepts = np.zeros((4, size, size), dtype=np.uint8)
    keypoints = np.zeros((NUM_KEYPOINTS, 2), dtype=np.float32)
    valid = np.zeros(NUM_KEYPOINTS, dtype=bool)

    n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    labels = []
    # Distractors first, the main object (k = 0) last so it lies on top and stays whole.
    for k in reversed(range(n_objects)):
        shape = int(rng.integers(len(SHAPES)))
        colour = int(rng.integers(len(COLOURS)))
        texture = int(rng.integers(len(TEXTURES)))
        if k == 0:
            r = rng.uniform(0.22, 0.32)
            cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
        else:
            r = rng.uniform(0.09, 0.15)
            cx, cy = rng.uniform(0.1, 0.9, size=2)
        theta = rng.uniform(0, 2 * np.pi)
        cos, sin = np.cos(theta), np.sin(theta)
        dx, dy = (xx - cx) / r, (yy - cy) / r
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # object-local coordinates
        verts = _VERTICES[SHAPES[shape]]
        inside = u**2 + v**2 <= 0.85**2 if verts is None else _inside_polygon(u, v, verts)

        rgb = np.clip(np.asarray(COLOURS[list(COLOURS)[colour]]) + rng.normal(0, 0.04, 3), 0, 1)
        period = rng.uniform(0.35, 0.6)  # in units of the object's radius
        if TEXTURES[texture] == "stripes":
            dark = np.sin(2 * np.pi * u / period) > 0
        elif TEXTURES[texture] == "dots":
            dark = ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < (0.3 * period) ** 2
        else:
            dark = np.zeros_like(inside)
        image[inside] = np.where(dark[inside, None], 0.45 * rgb, rgb)
        owner[inside] = k
        concepts[:3, inside] = np.array([shape + 1, colour + 1, texture + 1], dtype=np.uint8)[:, None]
        labels.append(shape)
        if k == 0:
            tips = _TIPS[SHAPES[shape]]
            pts = np.concatenate([np.zeros((1, 2)), tips])  # centre first
            px = cx + r * (pts[:, 0] * cos - pts[:, 1] * sin)
            py = cy + r * (pts[:, 0] * sin + pts[:, 1] * cos)
            keypoints[: len(pts)] = np.stack([px, py], axis=1) * size - 0.5
            valid[: len(pts)] = True

    concepts[3][owner < 0] = bg_kind + 1
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    instance_masks = owner[None] == np.arange(MAX_OBJECTS)[:, None, None]
    return {
        "image": image.transpose(2, 0, 1).astype(np.float32),
        "object_mask": instance_masks[0],
        "instance_masks": instance_masks,
        "concepts": concepts,
        "label": np.int64(labels[-1]),
        "keypoints": keypoints,
        "keypoint_valid": valid,
        "num_objects": np.int64(n_objects),
    }


class ShapesScenes(torch.utils.data.Dataset):
    """The embedded synthetic data set: ``len(self) = size`` scenes of one split.

    Sample ``i`` is scene ``SPLIT_OFFSETS[split] + i`` of the stream ``seed``, so splits never share a
    scene and every sample is reproducible. Each item is a dict of tensors (see :func:`render_scene`) plus
    ``index``, the global index.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: number of scenes.
        image_size: side in pixels (16-512; 32-128 is the intended range).
        seed: the stream; a different seed gives a different data set.
        transform: optional callable applied to the image tensor.

    >>> ds = ShapesScenes("val", size=4, image_size=32)
    >>> ds[0]["image"].shape, ds[0]["concepts"].shape
    (torch.Size([3, 32, 32]), torch.Size([4, 32, 32]))
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if split not in SPLIT_OFFSETS:
            raise ValueError(f"unknown split {split!r}: choose one of {list(SPLIT_OFFSETS)}")
        if not 0 < size <= MAX_SPLIT_SIZE:
            raise ValueError(f"size must be between 1 and {MAX_SPLIT_SIZE}, got {size}")
        render_scene(seed, 0, image_size)  # validates image_size early
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.transform = transform

    @classmethod
    def from_profile(cls, split: str, profile: str | Profile | None = None, seed: int = 0) -> ShapesScenes:
        """The split with the sizes of a profile (``n_train`` / ``n_val`` / ``n_test``, ``image_size``)."""
        p = get_profile(profile)
        size = {"train": p.n_train, "val": p.n_val, "test": p.n_test}.get(split)
        if size is None:
            raise ValueError(f"unknown split {split!r}: choose one of {list(SPLIT_OFFSETS)}")
        return cls(split, size=size, image_size=p.image_size, seed=seed)

    def __len__(self) -> int:
        return self.size

    def global_index(self, i: int) -> int:
        return SPLIT_OFFSETS[self.split] + i

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} scenes")
        i %= self.size
        sample = {k: torch.from_numpy(np.asarray(v)) for k, v in render_scene(
            self.seed, self.global_index(i), self.image_size).items()}
        if self.transform is not None:
            sample["image"] = self.transform(sample["image"])
        sample["index"] = torch.tensor(self.global_index(i))
        return sample

    def stack(self, progress: bool = True) -> dict[str, Tensor]:
        """Every sample at once: a dict of tensors with a leading dimension ``len(self)``."""
        items = [self[i] for i in tqdm(range(len(self)), desc=f"Shapes {self.split}", disable=not progress)]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}


@functools.lru_cache(maxsize=4)
def _rendered(split: str, size: int, image_size: int, seed: int) -> dict[str, Tensor]:
    from .scene_cache import cached_split  # here, not at the top: scene_cache imports this module

    return cached_split(split, size, image_size, seed)


def load_split(split: str, profile: str | Profile | None = None, seed: int = 0) -> dict[str, Tensor]:
    """The stacked split of a profile (:meth:`ShapesScenes.stack`), rendered once and kept on disk.

    Splits are read from the disk cache of :mod:`nemu_lib.scene_cache` (``outputs/cache/shapes``; set
    ``NEMU_SCENE_CACHE=0`` to always render) and rendered, in worker processes when large, on a miss.
    The last four splits asked for are kept in memory and shared between callers: treat them as
    read-only (copy before modifying in place).
    """
    p = get_profile(profile)
    ds = ShapesScenes.from_profile(split, p, seed)
    return _rendered(split, ds.size, ds.image_size, seed)


def normalize(images: Tensor, mean=SHAPES_MEAN, std=SHAPES_STD) -> Tensor:
    """``(images - mean) / std`` per channel; images ``(..., 3, H, W)`` in [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device)[:, None, None]
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - m) / s


class NormalizedImages:
    """Images held compactly (uint8, or float in [0, 1]) that come out normalised when indexed.

    Stands in for the normalised tensor that :func:`nemu_lib.train.train` and its validation loss take (they
    only use ``len`` and indexing), without a float copy of the whole data set in memory (per process under
    DDP).
    """

    def __init__(self, images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.images, self.mean, self.std = images, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def __getitem__(self, index) -> Tensor:
        x = self.images[index]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return normalize(x, self.mean, self.std)


def denormalize(x: Tensor, mean=SHAPES_MEAN, std=SHAPES_STD) -> Tensor:
    """Inverse of :func:`normalize`, for display."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return x * s + m


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``images (N, C, H, W)``."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).tolist())


def concept_names() -> list[str]:
    """Names ``"category/concept"`` in the order of :func:`concept_masks`' channels."""
    return [f"{cat}/{name}" for cat, names in CONCEPT_CATEGORIES.items() for name in names]


def concept_masks(concepts: Tensor) -> Tensor:
    """Binary masks ``(B, n_concepts, H, W)`` from concept maps ``(B, 4, H, W)`` (see ``concept_names``)."""
    planes = [concepts[:, c].long() == k + 1 for c, names in enumerate(CONCEPT_CATEGORIES.values())
              for k in range(len(names))]
    return torch.stack(planes, dim=1)


def scene_factors(split: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-scene labels ``(N,)`` of the main object's shape, colour and texture and of the background type.

    ``split`` is a stacked split (:meth:`ShapesScenes.stack`, :func:`load_split`) with ``label``, ``object_mask``
    ``(N, H, W)`` and ``concepts`` ``(N, 4, H, W)``. The main object lies on top and stays whole, so every pixel of
    its mask carries its colour and texture in the concept maps (value ``v + 1`` for concept ``v``); every
    background pixel carries the scene's background type. Values index ``CONCEPT_CATEGORIES[factor]``.

    >>> f = scene_factors(load_split("test", "smoke"))
    >>> sorted(f), f["colour"].shape
    (['background', 'colour', 'shape', 'texture'], torch.Size([64]))
    """
    obj = split["object_mask"]  # (N, H, W) bool
    concepts = split["concepts"].long()  # (N, 4, H, W): shape, colour, texture, background
    return {
        "shape": split["label"],
        "colour": (concepts[:, 1] * obj).amax(dim=(1, 2)) - 1,
        "texture": (concepts[:, 2] * obj).amax(dim=(1, 2)) - 1,
        "background": concepts[:, 3].amax(dim=(1, 2)) - 1,
    }


def mosaic(
    images: Tensor,
    k: int = 2,
    num: int = 1,
    generator: torch.Generator | None = None,
    out_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Tile ``k x k`` distinct images drawn from ``images (N, C, H, W)`` into ``num`` mosaics.

    Args:
        images: the pool to draw tiles from; needs at least ``k * k`` images.
        k: tiles per side.
        num: how many mosaics.
        generator: seeds the draw.
        out_size: resize each mosaic to ``out_size`` px (default: keep ``k * H`` x ``k * W``).

    Returns:
        ``mosaics (num, C, k*H, k*W)`` (or ``out_size``) and ``sources (num, k, k)``, on the CPU (drawn with a
        CPU generator, as they index a pool usually kept there): the index into ``images`` of the tile at each
        grid position (row, column).
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if k < 1 or images.shape[0] < k * k:
        raise ValueError(f"a {k}x{k} mosaic needs k >= 1 and at least {k * k} images, got {images.shape[0]}")
    n, c, h, w = images.shape
    sources = torch.stack([torch.randperm(n, generator=generator, device="cpu")[: k * k] for _ in range(num)])
    tiles = images[sources.flatten()].reshape(num, k, k, c, h, w)  # (num, row, col, C, H, W)
    mosaics = tiles.permute(0, 3, 1, 4, 2, 5).reshape(num, c, k * h, k * w)
    if out_size is not None:
        mosaics = torch.nn.functional.interpolate(mosaics, size=(out_size, out_size), mode="bilinear",
                                                  antialias=True, align_corners=False)
    return mosaics, sources.reshape(num, k, k)
