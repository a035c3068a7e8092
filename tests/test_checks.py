"""nemu_lib.checks.check_images: every bad input gets one clear error that names the problem."""

import numpy as np
import pytest
import torch

from nemu_lib.checks import check_images


def test_valid_input_returned_unchanged():
    x = torch.rand(2, 3, 16, 16)
    before = x.clone()
    out = check_images(x, channels=3, min_size=16)
    assert out is x
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_pass(dtype):
    x = torch.zeros(1, 3, 4, 4, dtype=dtype)
    assert check_images(x) is x


def test_channels_and_size_can_be_unchecked():
    x = torch.rand(1, 7, 2, 2)
    assert check_images(x, channels=None, min_size=None) is x


@pytest.mark.parametrize("bad, type_name", [([[1.0]], "list"), (np.zeros((1, 3, 8, 8), np.float32), "ndarray"),
                                            (None, "NoneType")])
def test_non_tensor(bad, type_name):
    with pytest.raises(TypeError) as info:
        check_images(bad)
    assert "torch.Tensor" in str(info.value)
    assert type_name in str(info.value)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_integer_dtype(dtype):
    with pytest.raises(TypeError) as info:
        check_images(torch.zeros(1, 3, 8, 8, dtype=dtype))
    message = str(info.value)
    assert str(dtype) in message
    assert "floating point" in message
    assert ".float()" in message


def test_3d_input_hints_batch_dimension():
    with pytest.raises(ValueError) as info:
        check_images(torch.rand(3, 16, 16), name="img")
    message = str(info.value)
    assert "(3, 16, 16)" in message
    assert "img[None]" in message


@pytest.mark.parametrize("shape", [(16, 16), (1, 1, 3, 16, 16)])
def test_other_ndim_no_hint(shape):
    with pytest.raises(ValueError) as info:
        check_images(torch.rand(*shape))
    assert str(tuple(shape)) in str(info.value)
    assert "[None]" not in str(info.value)


def test_wrong_channels():
    with pytest.raises(ValueError) as info:
        check_images(torch.rand(2, 16, 16, 3), channels=3)  # channels-last by mistake
    message = str(info.value)
    assert "16 channels" in message
    assert "takes 3" in message
    assert "(2, 16, 16, 3)" in message
    assert "permute" in message


def test_too_small():
    with pytest.raises(ValueError) as info:
        check_images(torch.rand(1, 3, 12, 20), min_size=16)
    message = str(info.value)
    assert "12x20" in message
    assert "16x16" in message
    # exactly min_size passes
    check_images(torch.rand(1, 3, 16, 16), min_size=16)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(value):
    x = torch.rand(2, 3, 8, 8)
    x[1, 2, 3, 4] = value
    with pytest.raises(ValueError) as info:
        check_images(x, name="batch")
    message = str(info.value)
    assert "NaN or Inf" in message
    assert message.startswith("batch")


def test_name_used_in_every_message():
    for bad, err in [(torch.zeros(1, 3, 8, 8, dtype=torch.int32), TypeError),
                     (torch.rand(1, 1, 8, 8), ValueError),
                     (torch.rand(1, 3, 4, 4), ValueError)]:
        with pytest.raises(err, match="^images"):
            check_images(bad, min_size=8, name="images")
