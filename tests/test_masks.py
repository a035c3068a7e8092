"""nemu_lib.masks: the RELAX mask distribution, exact against the reference package relax-xai."""

import pytest
import torch
from relax_xai.masking_functions import mask_generator

from nemu_lib.masks import mask_batches, relax_masks


@pytest.mark.parametrize("shape", [(32, 32), (48, 70), (224, 224)])
@pytest.mark.parametrize("num_cells", [7, 4])
def test_same_random_numbers_give_the_reference_masks(shape, num_cells):
    torch.manual_seed(3)
    reference = next(mask_generator(50, shape, "cpu", num_cells=num_cells))
    ours = relax_masks(50, shape, num_cells=num_cells, generator=torch.Generator().manual_seed(3))
    assert ours.shape == (50, 1, *shape) and ours.dtype == torch.float32
    assert torch.equal(ours, reference)


def test_global_generator_and_p_keep_match_the_reference():
    torch.manual_seed(7)
    reference = next(mask_generator(20, (40, 40), "cpu", probablity_of_drop=0.2))
    torch.manual_seed(7)
    assert torch.equal(relax_masks(20, (40, 40), p_keep=0.2), reference)


def test_batches_equal_the_references_successive_calls():
    torch.manual_seed(0)
    reference = torch.cat([next(mask_generator(10, (32, 32), "cpu")) for _ in range(3)])
    ours = torch.cat(list(mask_batches(30, 10, (32, 32), generator=torch.Generator().manual_seed(0))))
    assert torch.equal(ours, reference)


def test_batch_sizes_and_remainder():
    sizes = [len(m) for m in mask_batches(25, 10, (16, 16), generator=torch.Generator().manual_seed(0))]
    assert sizes == [10, 10, 5]


def test_values_mean_and_smoothness():
    m = relax_masks(2000, (64, 64), p_keep=0.5, generator=torch.Generator().manual_seed(0))
    assert 0 <= m.min() and m.max() <= 1
    assert abs(m.mean().item() - 0.5) < 0.01  # E[M] = p_keep (bilinear interpolation is an average)
    assert not ((m > 0) & (m < 1)).all()  # cell centres hold exact 0/1 values ...
    assert ((m > 0.01) & (m < 0.99)).float().mean() > 0.3  # ... and the rest is a smooth blend
    # neighbouring pixels differ by at most one cell's step spread over a cell (~64 / 7 px)
    assert (m[..., 1:] - m[..., :-1]).abs().max() < 0.2
    full = relax_masks(5, (32, 32), p_keep=1.0)
    assert torch.equal(full, torch.ones_like(full))


def test_same_seed_same_masks_and_different_seed_different_masks():
    a = relax_masks(4, (32, 32), generator=torch.Generator().manual_seed(1))
    b = relax_masks(4, (32, 32), generator=torch.Generator().manual_seed(1))
    c = relax_masks(4, (32, 32), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0, shape=(32, 32)), "n must be"),
        (dict(n=2, shape=(32,)), "shape must be"),
        (dict(n=2, shape=(32, 32), num_cells=0), "num_cells"),
        (dict(n=2, shape=(3, 32)), "too small"),
        (dict(n=2, shape=(32, 32), p_keep=1.5), "probability"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        relax_masks(**kwargs)


def test_bad_batch_arguments():
    with pytest.raises(ValueError, match="n_masks"):
        next(mask_batches(0, 10, (32, 32)))
    with pytest.raises(ValueError, match="batch_size"):
        next(mask_batches(10, 0, (32, 32)))
