"""nemu_lib.data: the synthetic Shapes scenes, normalisation, concept maps and mosaics."""

import math

import numpy as np
import pytest
import torch

from nemu_lib import data
from nemu_lib.config import get_profile
from nemu_lib.data import (
    CONCEPT_CATEGORIES,
    MAX_OBJECTS,
    MAX_SPLIT_SIZE,
    NUM_KEYPOINTS,
    SHAPES,
    SHAPES_MEAN,
    SHAPES_STD,
    SPLIT_OFFSETS,
    ShapesScenes,
    channel_stats,
    concept_masks,
    concept_names,
    denormalize,
    mosaic,
    normalize,
)

TIPS_PER_SHAPE = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "cross": 4, "hexagon": 6}
N_SCENES = 600


@pytest.fixture(scope="module")
def scenes():
    """600 training scenes at 32 px, stacked (about a second)."""
    return ShapesScenes("train", size=N_SCENES, image_size=32, seed=0).stack(progress=False)


# ---------------------------------------------------------------- determinism and splits

def _assert_same_sample(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_seed_and_index_same_sample():
    a = ShapesScenes("train", size=20, image_size=32, seed=7)
    b = ShapesScenes("train", size=50, image_size=32, seed=7)  # another object, another size
    for i in (0, 3, 19):
        _assert_same_sample(a[i], b[i])
    _assert_same_sample(a[5], a[5])


def test_different_seed_differs():
    a = ShapesScenes("train", size=5, image_size=32, seed=0)
    b = ShapesScenes("train", size=5, image_size=32, seed=1)
    for i in range(5):
        assert not torch.equal(a[i]["image"], b[i]["image"])


def test_render_scene_is_pure():
    one = data.render_scene(3, 11, 32)
    two = data.render_scene(3, 11, 32)
    for k in one:
        assert np.array_equal(one[k], two[k])


def test_splits_never_share_an_index():
    ranges = []
    for split in SPLIT_OFFSETS:
        ds = ShapesScenes(split, size=MAX_SPLIT_SIZE, image_size=32)
        ranges.append((ds.global_index(0), ds.global_index(len(ds) - 1)))
    ranges.sort()
    for (lo_a, hi_a), (lo_b, hi_b) in zip(ranges, ranges[1:], strict=False):
        assert lo_a <= hi_a < lo_b <= hi_b


def test_splits_differ_and_index_field():
    samples = {split: ShapesScenes(split, size=3, image_size=32)[2] for split in SPLIT_OFFSETS}
    for split, sample in samples.items():
        assert sample["index"].item() == SPLIT_OFFSETS[split] + 2
    images = [s["image"] for s in samples.values()]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not torch.equal(images[i], images[j])


def test_negative_index_and_out_of_range():
    ds = ShapesScenes("val", size=4, image_size=32)
    _assert_same_sample(ds[-1], ds[3])
    for bad in (4, 100, -5):
        with pytest.raises(IndexError, match="out of range"):
            ds[bad]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ShapesScenes("dev", size=4)
    for size in (0, -1, MAX_SPLIT_SIZE + 1):
        with pytest.raises(ValueError, match="size must be"):
            ShapesScenes("train", size=size, image_size=32)
    for image_size in (8, 15, 513):
        with pytest.raises(ValueError, match="image_size"):
            ShapesScenes("train", size=4, image_size=image_size)


def test_transform_applies_to_image_only():
    plain = ShapesScenes("test", size=2, image_size=32)[1]
    flipped = ShapesScenes("test", size=2, image_size=32, transform=lambda im: im.flip(-1))[1]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["object_mask"], plain["object_mask"])


# ---------------------------------------------------------------- the fields of a sample

@pytest.mark.parametrize("size", [32, 48, 64, 128])
def test_field_shapes_and_dtypes(size):
    s = ShapesScenes("train", size=2, image_size=size)[1]
    expected = {
        "image": ((3, size, size), torch.float32),
        "object_mask": ((size, size), torch.bool),
        "instance_masks": ((MAX_OBJECTS, size, size), torch.bool),
        "concepts": ((4, size, size), torch.uint8),
        "label": ((), torch.int64),
        "keypoints": ((NUM_KEYPOINTS, 2), torch.float32),
        "keypoint_valid": ((NUM_KEYPOINTS,), torch.bool),
        "num_objects": ((), torch.int64),
        "index": ((), torch.int64),
    }
    assert set(s) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert tuple(s[k].shape) == shape, k
        assert s[k].dtype == dtype, k
    assert 0 <= s["image"].min() and s["image"].max() <= 1


def test_stack_shapes(scenes):
    n = N_SCENES
    assert scenes["image"].shape == (n, 3, 32, 32)
    assert scenes["object_mask"].shape == (n, 32, 32)
    assert scenes["instance_masks"].shape == (n, MAX_OBJECTS, 32, 32)
    assert scenes["concepts"].shape == (n, 4, 32, 32)
    assert scenes["label"].shape == (n,)
    assert scenes["keypoints"].shape == (n, NUM_KEYPOINTS, 2)
    assert scenes["keypoint_valid"].shape == (n, NUM_KEYPOINTS)
    assert scenes["num_objects"].shape == (n,)
    assert torch.equal(scenes["index"], torch.arange(n))


def test_images_in_unit_range(scenes):
    image = scenes["image"]
    assert image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.1  # not blank


def test_masks_consistent(scenes):
    inst = scenes["instance_masks"]
    assert torch.equal(scenes["object_mask"], inst[:, 0])
    assert (inst.sum(1) <= 1).all()  # instances are disjoint
    assert scenes["object_mask"].flatten(1).any(1).all()  # the main object is always visible
    # instances beyond num_objects are empty
    n_obj = scenes["num_objects"]
    assert ((1 <= n_obj) & (n_obj <= MAX_OBJECTS)).all()
    slots = torch.arange(MAX_OBJECTS)[None, :]
    unused = slots >= n_obj[:, None]  # (N, MAX_OBJECTS)
    assert not inst.flatten(2).any(2)[unused].any()
    # all object counts occur
    assert set(n_obj.tolist()) == set(range(1, MAX_OBJECTS + 1))


def test_concepts_match_masks(scenes):
    concepts = scenes["concepts"]
    assert concepts.dtype == torch.uint8
    on_object = scenes["instance_masks"].any(1)  # (N, H, W)
    for plane in range(3):  # shape, colour, texture
        assert torch.equal(concepts[:, plane] > 0, on_object), plane
    assert torch.equal(concepts[:, 3] > 0, ~on_object)  # background
    for plane, names in enumerate(CONCEPT_CATEGORIES.values()):
        assert concepts[:, plane].max() <= len(names)


def test_object_pixels_carry_label(scenes):
    shape_plane = scenes["concepts"][:, 0].long() - 1  # (N, H, W)
    label = scenes["label"][:, None, None].expand_as(shape_plane)
    mask = scenes["object_mask"]
    assert torch.equal(shape_plane[mask], label[mask])
    assert ((0 <= scenes["label"]) & (scenes["label"] < len(SHAPES))).all()


def test_keypoints(scenes):
    kp, valid, label = scenes["keypoints"], scenes["keypoint_valid"], scenes["label"]
    size = 32
    expected_counts = torch.tensor([1 + TIPS_PER_SHAPE[name] for name in SHAPES])
    assert torch.equal(valid.sum(1), expected_counts[label])
    # valid entries come first, invalid ones are zero
    assert torch.equal(valid, torch.arange(NUM_KEYPOINTS)[None] < valid.sum(1, keepdim=True))
    assert (kp[~valid] == 0).all()
    # the centre keypoint lies inside the main object's mask
    col = kp[:, 0, 0].round().long()
    row = kp[:, 0, 1].round().long()
    assert ((0 <= col) & (col < size) & (0 <= row) & (row < size)).all()
    assert scenes["object_mask"][torch.arange(N_SCENES), row, col].all()
    # every corner / tip is at the same distance r * size from the centre (r in [0.22, 0.32])
    dist = (kp[:, 1:] - kp[:, :1]).norm(dim=-1)  # (N, NUM_KEYPOINTS - 1)
    tips = valid[:, 1:]
    for i in range(N_SCENES):
        d = dist[i][tips[i]]
        if len(d):
            assert d.max() - d.min() < 1e-3
            assert 0.22 * size - 1e-3 <= d[0] <= 0.32 * size + 1e-3
    # all keypoints lie within the image
    assert (kp[valid] >= -0.5).all() and (kp[valid] <= size - 0.5).all()


def test_class_balance(scenes):
    counts = torch.bincount(scenes["label"], minlength=len(SHAPES)).float()
    share = counts / counts.sum()
    assert ((share >= 0.10) & (share <= 0.24)).all(), dict(zip(SHAPES, share.tolist(), strict=True))


def test_from_profile(monkeypatch):
    for split, field in (("train", "n_train"), ("val", "n_val"), ("test", "n_test")):
        for name in ("smoke", "cpu"):
            ds = ShapesScenes.from_profile(split, name)
            profile = get_profile(name)
            assert len(ds) == getattr(profile, field)
            assert ds.image_size == profile.image_size
            assert ds.split == split
    monkeypatch.setenv("NEMU_PROFILE", "smoke")
    assert len(ShapesScenes.from_profile("train")) == get_profile("smoke").n_train
    assert ShapesScenes.from_profile("val", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown split"):
        ShapesScenes.from_profile("dev", "smoke")


def test_dataloader_collates():
    ds = ShapesScenes("val", size=6, image_size=32)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert torch.equal(batch["index"], SPLIT_OFFSETS["val"] + torch.arange(4))


# ---------------------------------------------------------------- normalisation and statistics

@pytest.mark.slow
def test_shapes_mean_std_match_training_data():
    """The constants must match the training split at 64 px (the docstring promises they are measured)."""
    images = ShapesScenes("train", size=1000, image_size=64).stack(progress=False)["image"]
    mean, std = channel_stats(images)
    measured = f"measured mean {tuple(round(v, 4) for v in mean)}, std {tuple(round(v, 4) for v in std)}"
    assert np.allclose(mean, SHAPES_MEAN, atol=0.02), f"SHAPES_MEAN {SHAPES_MEAN} is stale: {measured}"
    assert np.allclose(std, SHAPES_STD, atol=0.02), f"SHAPES_STD {SHAPES_STD} is stale: {measured}"


def test_channel_stats():
    images = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 3.0)])[None].expand(2, 2, 4, 4)
    images = images.clone()
    images[1, 0] = 5.0  # channel 0: values 1 (16x) and 5 (16x)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((3.0, 3.0))
    assert std[1] == pytest.approx(0.0)
    assert std[0] == pytest.approx(math.sqrt(16 * 4 * 2 / 31))  # unbiased std


def test_normalize_round_trip():
    x = torch.rand(5, 3, 8, 8)
    assert torch.allclose(denormalize(normalize(x)), x, atol=1e-6)
    assert torch.allclose(normalize(denormalize(x)), x, atol=1e-5)
    single = torch.rand(3, 8, 8)  # (3, H, W) works too
    assert torch.allclose(denormalize(normalize(single)), single, atol=1e-6)
    custom = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(custom, (x - 0.5) / 0.25)


def test_normalize_maps_mean_to_zero():
    mean_image = torch.tensor(SHAPES_MEAN)[:, None, None].expand(3, 4, 4)
    assert torch.allclose(normalize(mean_image), torch.zeros(3, 4, 4), atol=1e-6)
    one_std = mean_image + torch.tensor(SHAPES_STD)[:, None, None]
    assert torch.allclose(normalize(one_std), torch.ones(3, 4, 4), atol=1e-5)
    assert normalize(mean_image.double()).dtype == torch.float64


# ---------------------------------------------------------------- concepts

def test_concept_names():
    names = concept_names()
    assert len(names) == sum(len(v) for v in CONCEPT_CATEGORIES.values()) == 18
    assert len(set(names)) == len(names)
    assert names[0] == "shape/circle" and names[-1] == f"background/{data.BACKGROUNDS[-1]}"
    assert all(n.split("/")[0] in CONCEPT_CATEGORIES for n in names)


def test_concept_masks(scenes):
    concepts = scenes["concepts"][:50]
    masks = concept_masks(concepts)
    names = concept_names()
    assert masks.shape == (50, len(names), 32, 32)
    assert masks.dtype == torch.bool
    # each channel is exactly its concept's pixels
    for c, name in enumerate(names):
        cat, concept = name.split("/")
        plane = list(CONCEPT_CATEGORIES).index(cat)
        k = list(CONCEPT_CATEGORIES[cat]).index(concept)
        assert torch.equal(masks[:, c], concepts[:, plane] == k + 1), name
    # each pixel is exactly one shape-or-background concept (and one colour-or-background, ...)
    by_cat = {cat: [i for i, n in enumerate(names) if n.startswith(cat + "/")] for cat in CONCEPT_CATEGORIES}
    background = masks[:, by_cat["background"]].sum(1)
    for cat in ("shape", "colour", "texture"):
        total = masks[:, by_cat[cat]].sum(1) + background
        assert (total == 1).all(), cat


# ---------------------------------------------------------------- mosaics

def test_mosaic_tiles_are_sources():
    images = torch.rand(10, 3, 6, 5)  # non-square tiles, all distinct
    k, num = 3, 4
    mosaics, sources = mosaic(images, k=k, num=num, generator=torch.Generator().manual_seed(0))
    assert mosaics.shape == (num, 3, k * 6, k * 5)
    assert sources.shape == (num, k, k)
    assert sources.dtype == torch.int64
    for i in range(num):
        assert len(set(sources[i].flatten().tolist())) == k * k  # distinct tiles
        for r in range(k):
            for c in range(k):
                tile = mosaics[i, :, r * 6:(r + 1) * 6, c * 5:(c + 1) * 5]
                assert torch.equal(tile, images[sources[i, r, c]]), (i, r, c)


def test_mosaic_generator_reproducible():
    images = torch.rand(8, 3, 4, 4)
    a = mosaic(images, k=2, num=3, generator=torch.Generator().manual_seed(5))
    b = mosaic(images, k=2, num=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = mosaic(images, k=2, num=3, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a[1], c[1])


def test_mosaic_exact_pool_and_k1():
    images = torch.rand(4, 3, 4, 4)
    _, sources = mosaic(images, k=2, num=2)
    for i in range(2):
        assert sorted(sources[i].flatten().tolist()) == [0, 1, 2, 3]
    single, src = mosaic(images, k=1)
    assert torch.equal(single[0], images[src[0, 0, 0]])


def test_mosaic_out_size():
    values = torch.linspace(0.1, 0.9, 6)
    images = values[:, None, None, None].expand(6, 3, 16, 16).clone()  # one flat grey per image
    mosaics, sources = mosaic(images, k=2, num=2, out_size=20)
    assert mosaics.shape == (2, 3, 20, 20)
    assert sources.shape == (2, 2, 2)
    small, sources = mosaic(images, k=2, num=3, out_size=16)  # 32 px -> 16 px: 8 px per tile
    assert small.shape == (3, 3, 16, 16)
    for i in range(3):
        for r in range(2):
            for c in range(2):
                inner = small[i, :, r * 8 + 2:r * 8 + 6, c * 8 + 2:c * 8 + 6]  # away from tile borders
                assert torch.allclose(inner, values[sources[i, r, c]].expand_as(inner), atol=1e-5)


def test_mosaic_errors():
    with pytest.raises(ValueError, match="at least 9 images, got 8"):
        mosaic(torch.rand(8, 3, 4, 4), k=3)
    with pytest.raises(ValueError, match="k >= 1"):
        mosaic(torch.rand(8, 3, 4, 4), k=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        mosaic(torch.rand(3, 4, 4), k=1)
