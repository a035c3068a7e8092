"""nemu_lib.metrics, the functions the notebooks print and assert: object contrast, relative RMS error, tile means."""

import math

import pytest
import torch
from conftest import stray_tensor_guard
from torch.testing import assert_close

from nemu_lib.metrics import object_contrast, relative_rms_error, tile_means


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_object_contrast_by_hand(device, dtype):
    # map 0: inside 3, outside mean 1; pixels 3, 1, 1, 1 have mean 1.5 and sample variance (2.25 + 3 · 0.25) / 3 = 1
    # map 1: inside (4 + 2) / 2 = 3, outside (0 + 2) / 2 = 1; pixels 4, 2, 0, 2: sample variance (4 + 0 + 4 + 0) / 3
    a = torch.tensor([[[3.0, 1.0], [1.0, 1.0]], [[4.0, 0.0], [2.0, 2.0]]], dtype=dtype, device=device)
    gt = torch.tensor([[[True, False], [False, False]], [[True, False], [True, False]]], device=device)
    with stray_tensor_guard():
        c = object_contrast(a, gt)
    assert c.dtype == torch.float64 and c.device.type == device.type
    assert_close(c.cpu(), torch.tensor([2.0, 2.0 / math.sqrt(8 / 3)], dtype=torch.float64))
    assert_close(object_contrast(-a, gt), -c)  # the sign says which side is higher
    assert_close(object_contrast(10 * a + 7, gt), c)  # the level and the scale do not count


def test_object_contrast_is_nan_without_a_spread_or_a_background():
    gt = torch.tensor([[[True, False], [False, False]], [[True, True], [True, True]]])
    a = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]])
    assert torch.isnan(object_contrast(a, gt)).all()  # map 0 constant; map 1's object covers the image
    with pytest.raises(ValueError, match="gt is empty"):
        object_contrast(a, torch.zeros_like(gt))


def test_relative_rms_error_by_hand(device):
    ref = torch.tensor([[[0.0, 0.0], [2.0, 2.0]]], device=device)  # mean 1, sample std sqrt(4 / 3)
    a = ref + torch.tensor([[[1.0, -1.0], [1.0, -1.0]]], device=device)  # RMS difference 1
    with stray_tensor_guard():
        e = relative_rms_error(a, ref)
    assert e.dtype == torch.float64 and e.device.type == device.type
    assert_close(e.cpu(), torch.tensor([math.sqrt(3 / 4)], dtype=torch.float64))
    assert_close(relative_rms_error(ref, ref).cpu(), torch.zeros(1, dtype=torch.float64))
    assert_close(relative_rms_error(3 * a, 3 * ref), e)  # in units of the reference's spread


def test_relative_rms_error_constant_reference_and_shapes():
    assert torch.isnan(relative_rms_error(torch.rand(1, 2, 2), torch.ones(1, 2, 2))).all()
    with pytest.raises(ValueError, match="same shape"):
        relative_rms_error(torch.rand(1, 2, 2), torch.rand(2, 2, 2))


def test_tile_means_by_hand(device):
    a = torch.arange(16.0, device=device).view(1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    # 2 x 2 tiles of 2 x 2 px, row by row: (0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, ...
    with stray_tensor_guard():
        t = tile_means(a, 2)
    assert t.dtype == torch.float64 and t.device.type == device.type
    assert_close(t.cpu(), torch.tensor([[2.5, 4.5, 10.5, 12.5]], dtype=torch.float64))
    assert_close(tile_means(a, 1).cpu(), a.double().mean().view(1, 1).cpu())
    assert_close(tile_means(a, 4).cpu(), a.double().flatten(1).cpu())  # 1-px tiles: the map itself


def test_tile_means_needs_equal_tiles():
    with pytest.raises(ValueError, match="equal tiles"):
        tile_means(torch.rand(1, 5, 4), 2)
