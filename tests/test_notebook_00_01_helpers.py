"""Helpers that notebooks 00 and 01 print or assert: scene factors, step counts, neighbours, standard errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import stray_tensor_guard
from torch import nn
from torch.testing import assert_close

from nemu_lib.data import CONCEPT_CATEGORIES, ShapesScenes, normalize, scene_factors
from nemu_lib.probes import accuracy_se, embed, embed_resized, knn_accuracy, nearest_neighbours, neighbour_precision
from nemu_lib.ssl import fit, training_steps

# ----------------------------------------------------------------------------------- scene_factors


def _tiny_split(dev):
    """Two 2 x 2 scenes whose factors are known by hand (concept value v + 1 = concept v)."""
    obj = torch.tensor([[[True, False], [False, False]],
                        [[False, True], [True, False]]], device=dev)
    concepts = torch.zeros(2, 4, 2, 2, dtype=torch.uint8, device=dev)
    concepts[0, 0] = torch.tensor([[5, 0], [0, 0]])  # scene 0: shape 4 at the object pixel
    concepts[0, 1] = torch.tensor([[3, 0], [0, 0]])  # colour 2
    concepts[0, 2] = torch.tensor([[2, 0], [0, 0]])  # texture 1
    concepts[0, 3] = torch.tensor([[0, 1], [1, 1]])  # background 0
    concepts[1, 1] = torch.tensor([[0, 1], [1, 6]])  # scene 1: colour 0 on the object; a distractor of colour 5
    concepts[1, 2] = torch.tensor([[0, 3], [3, 1]])  # texture 2; the distractor's texture 0
    concepts[1, 3] = torch.tensor([[3, 0], [0, 0]])  # background 2
    return {"label": torch.tensor([4, 0], device=dev), "object_mask": obj, "concepts": concepts}


def test_scene_factors_by_hand(device):
    f = scene_factors(_tiny_split(device))
    expected = {"shape": [4, 0], "colour": [2, 0], "texture": [1, 2], "background": [0, 2]}
    assert set(f) == set(expected)
    for name, values in expected.items():
        assert f[name].device.type == device.type
        assert f[name].tolist() == values, name


def test_scene_factors_of_rendered_scenes_name_the_main_objects_concepts():
    split = ShapesScenes("train", size=12, image_size=32).stack(progress=False)
    f = scene_factors(split)
    assert torch.equal(f["shape"], split["label"])
    for name in ("colour", "texture", "background"):
        assert ((f[name] >= 0) & (f[name] < len(CONCEPT_CATEGORIES[name]))).all(), name
    for i in range(12):  # every pixel of the main object carries its colour and texture
        obj = split["object_mask"][i]
        assert (split["concepts"][i, 1][obj].long() == f["colour"][i] + 1).all()
        assert (split["concepts"][i, 2][obj].long() == f["texture"][i] + 1).all()


# ---------------------------------------------------------------------------------- training_steps


@pytest.mark.parametrize(("n", "epochs", "batch_size", "steps"), [
    (100, 3, 32, 9),  # 3 full batches per epoch, the last 4 samples dropped
    (64, 2, 32, 4),
    (10, 2, 32, 2),  # a batch larger than the data set holds all 10 samples: one step per epoch
    (50, 0, 8, 0),
])
def test_training_steps_by_hand(n, epochs, batch_size, steps):
    assert training_steps(n, epochs, batch_size) == steps


def test_training_steps_counts_the_steps_fit_takes():
    model = nn.Linear(2, 1)
    x = torch.randn(10, 2)
    history = fit(model, lambda idx: model(x[idx]).pow(2).mean(), n=10, epochs=3, batch_size=4, lr=1e-3,
                  progress=False)
    assert len(history) == training_steps(10, 3, 4) == 6


def test_training_steps_rejects_nonsense():
    with pytest.raises(ValueError):
        training_steps(0, 1, 32)
    with pytest.raises(ValueError):
        training_steps(10, 1, 0)


# ------------------------------------------------------------------------------------- accuracy_se


def test_accuracy_se_by_hand():
    assert accuracy_se(0.5, 100) == pytest.approx(0.05)
    assert accuracy_se(0.9, 400) == pytest.approx(0.015)  # sqrt(0.09 / 400)
    assert accuracy_se(1.0, 10) == 0.0
    with pytest.raises(ValueError):
        accuracy_se(1.5, 10)
    with pytest.raises(ValueError):
        accuracy_se(0.5, 0)


# ------------------------------------------------------------------------ nearest neighbours, precision


def test_nearest_neighbours_by_hand(device):
    queries = torch.tensor([[1.0, 0.0], [0.0, 3.0]], device=device)
    refs = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 1.0]], device=device)
    # cosine similarities: query 0 -> (1, 0, 1/sqrt 2); query 1 -> (0, -1, 1/sqrt 2)
    sims, idx = nearest_neighbours(queries, refs, k=2)
    assert idx.tolist() == [[0, 2], [2, 0]]
    r = 1 / math.sqrt(2)
    assert_close(sims, torch.tensor([[1.0, r], [r, 0.0]], device=device))


def test_neighbour_precision_by_hand(device):
    idx = torch.tensor([[0, 1, 2], [2, 3, 3]], device=device)
    y_ref = torch.tensor([1, 1, 0, 2], device=device)
    y_query = torch.tensor([1, 2], device=device)
    # query 0: labels (1, 1, 0) vs 1 -> 2 of 3; query 1: labels (0, 2, 2) vs 2 -> 2 of 3
    assert neighbour_precision(idx, y_ref, y_query) == pytest.approx(4 / 6)


def test_precision_at_1_is_the_1_nn_accuracy():
    gen = torch.Generator().manual_seed(0)
    z_ref, z_query = torch.randn(40, 8, generator=gen), torch.randn(15, 8, generator=gen)
    y_ref, y_query = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (15,), generator=gen)
    _, idx = nearest_neighbours(z_query, z_ref, k=1)
    assert neighbour_precision(idx, y_ref, y_query) == pytest.approx(knn_accuracy(z_ref, y_ref, z_query, y_query, k=1))


# ------------------------------------------------------------------------------------- embed_resized


class _ChannelMean(nn.Module):
    """An 'encoder' whose z is the mean of each input channel, with ImageNet-like statistics of its own."""

    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # embed reads the device off a parameter

    def forward(self, x):
        assert x.shape[-2:] == (8, 8)  # resized before the encoder
        return x.mean(dim=(2, 3))  # (N, 3)


def test_embed_resized_by_hand(device):
    encoder = _ChannelMean().to(device)
    images = torch.full((3, 3, 5, 5), 0.75, device=device)  # constant images stay constant when resized
    z = embed_resized(encoder, images, size=8, batch_size=2)
    # (0.75 - mean) / std per channel: (0.25 / 0.5, 0.5 / 0.25, 0.75 / 1) = (0.5, 2, 0.75)
    assert_close(z, torch.tensor([[0.5, 2.0, 0.75]]).expand(3, 3))
    assert z.device.type == "cpu"


def test_embed_resized_does_not_depend_on_the_batch_size():
    encoder = _ChannelMean()
    images = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    expected = embed(encoder, normalize(F.interpolate(images, size=(8, 8), mode="bilinear", antialias=True),
                                        encoder.mean, encoder.std))
    for batch_size in (1, 2, 256):
        assert_close(embed_resized(encoder, images, size=8, batch_size=batch_size), expected)


def test_no_tensor_is_created_off_the_inputs_device():
    """Under a ``meta`` default device, a tensor made without naming the inputs' device would fail to mix."""
    split = _tiny_split(torch.device("cpu"))
    z_query, z_ref = torch.randn(3, 4), torch.randn(6, 4)
    y_query, y_ref = torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1, 0, 0, 1])
    with stray_tensor_guard():
        f = scene_factors(split)
        _, idx = nearest_neighbours(z_query, z_ref, k=2)
        precision = neighbour_precision(idx, y_ref, y_query)
    assert f["colour"].device.type == "cpu" and 0.0 <= precision <= 1.0
