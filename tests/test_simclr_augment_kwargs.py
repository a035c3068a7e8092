"""nemu_lib.ssl.train_simclr's ``augment`` keyword arguments: none given trains exactly as before."""

import pytest
import torch

from nemu_lib.encoders import SmallResNet
from nemu_lib.ssl import train_simclr


def _run(augment):
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 8))
    images = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return train_simclr(enc, images, epochs=1, batch_size=16, progress=False, augment=augment)


def test_no_augment_arguments_change_nothing():
    assert _run(None) == _run({})


def test_augment_arguments_reach_the_augmentation():
    assert _run({"scale": (1.0, 1.0), "p_jitter": 0.0, "p_gray": 0.0, "p_blur": 0.0}) != _run(None)
    with pytest.raises(TypeError, match="no_such_option"):
        _run({"no_such_option": 1})
