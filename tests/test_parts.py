"""nemu_lib.parts: unit centres and peaks by hand, the instability against a loop over the formula, the floor and
chance levels on the Shapes scenes' keypoints, top-k selection, invariances, devices and errors."""

import math

import numpy as np
import pytest
import torch
from conftest import stray_tensor_guard
from torch import Tensor
from torch.testing import assert_close

from nemu_lib.data import load_split
from nemu_lib.parts import (
    chance_peaks,
    location_instability,
    on_mask,
    peak_positions,
    quantised_landmark_peaks,
    unit_centres,
)

# ------------------------------------------------------------------------------------------------- unit_centres


def test_unit_centres_square_row_major():
    c = unit_centres(8, 8, 64)  # 8 px per unit: centres 3.5, 11.5, ..., 59.5
    assert c.shape == (64, 2) and c.dtype == torch.float32
    assert c[0].tolist() == [3.5, 3.5]
    assert c[-1].tolist() == [59.5, 59.5]
    assert c[1].tolist() == [11.5, 3.5]  # next column: x moves
    assert c[8].tolist() == [3.5, 11.5]  # next row: y moves
    assert c[3 * 8 + 5].tolist() == [5 * 8 + 3.5, 3 * 8 + 3.5]


def test_unit_centres_non_square():
    c = unit_centres(2, 4, (20, 60))  # 10 px per row, 15 px per column
    xs, ys = [7.0, 22.0, 37.0, 52.0], [4.5, 14.5]
    assert c.tolist() == [[x, y] for y in ys for x in xs]
    assert unit_centres(1, 1, (7, 9)).tolist() == [[4.0, 3.0]]  # one unit: the image's centre


def test_unit_centres_identity_grid():
    """One unit per pixel: the centres are the pixel indices."""
    c = unit_centres(3, 5, (3, 5))
    assert c.tolist() == [[float(j), float(i)] for i in range(3) for j in range(5)]


# ----------------------------------------------------------------------------------------------- peak_positions


def _planted_maps(dtype: torch.dtype = torch.float32) -> tuple[Tensor, list[tuple[int, int]], list[float]]:
    """Maps ``(2, 3, 4, 5)`` of negative noise with one hot unit per (image, filter) at a known (i, j)."""
    g = torch.Generator().manual_seed(0)
    maps = -torch.rand(2, 3, 4, 5, generator=g)
    where = [(0, 0), (3, 4), (1, 2), (2, 0), (0, 4), (3, 1)]
    values = [1.0, 2.5, 0.5, 3.0, 0.25, 4.0]
    for (n, f), (i, j), v in zip(np.ndindex(2, 3), where, values, strict=True):
        maps[n, f, i, j] = v
    return maps.to(dtype), where, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_peak_positions_planted(dtype):
    maps, where, values = _planted_maps(dtype)
    peaks, weights = peak_positions(maps, (16, 20))  # 4 px per unit both ways: centre 4 * index + 1.5
    assert peaks.shape == (2, 3, 2) and weights.shape == (2, 3)
    assert peaks.dtype == weights.dtype == torch.float32
    expected = torch.tensor([[4 * j + 1.5, 4 * i + 1.5] for i, j in where]).view(2, 3, 2)
    assert_close(peaks, expected, rtol=0, atol=0)
    assert_close(weights, torch.tensor(values).view(2, 3), rtol=0, atol=0)


def test_peak_positions_ties_take_the_first_unit():
    maps = torch.zeros(1, 1, 2, 2)
    maps[0, 0, 1, :] = 1.0  # (1, 0) and (1, 1) tie
    peaks, weights = peak_positions(maps, 8)
    assert peaks.tolist() == [[[1.5, 5.5]]] and weights.tolist() == [[1.0]]


# ----------------------------------------------------------------------------------------- location_instability


def _reference(peaks, landmarks, weights, valid, k, image_size) -> np.ndarray:
    """The formula, one filter and one landmark at a time (NumPy, population std)."""
    p, q, w, v = peaks.double().numpy(), landmarks.double().numpy(), weights.double().numpy(), valid.numpy()
    n, f = w.shape
    out = np.full(f, np.nan)
    for fi in range(f):
        top = np.argsort(-w[:, fi], kind="stable")[: min(k, n)]
        spreads = []
        for li in range(q.shape[1]):
            d = [np.linalg.norm(p[x, fi] - q[x, li]) for x in top if v[x, li]]
            if len(d) >= 2:
                spreads.append(np.std(d))  # ddof=0
        if spreads:
            out[fi] = np.mean(spreads) / math.hypot(*image_size)
    return out


def _random_instance(n=12, f=5, n_landmarks=4, seed=0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    peaks = torch.rand(n, f, 2, generator=g) * torch.tensor([40.0, 24.0])
    landmarks = torch.rand(n, n_landmarks, 2, generator=g) * torch.tensor([40.0, 24.0])
    weights = torch.randn(n, f, generator=g)
    valid = torch.rand(n, n_landmarks, generator=g) < 0.7
    valid[:, 0] = True  # the centre always exists
    valid[:, -1] = False
    valid[0, -1] = True  # the last landmark is valid on one image only: skipped by every filter
    landmarks[~valid] = torch.nan  # anything may stand where a landmark does not exist
    return peaks, landmarks, weights, valid


@pytest.mark.parametrize("k", [2, 5, 100])
def test_location_instability_equals_the_formula(k):
    peaks, landmarks, weights, valid = _random_instance()
    got = location_instability(peaks, landmarks, weights, k, image_size=(24, 40), valid=valid)
    assert got.shape == (5,) and got.dtype == torch.float64
    expected = torch.from_numpy(_reference(peaks, landmarks, weights, valid, k, (24, 40)))
    assert_close(got, expected, equal_nan=True)
    assert torch.isfinite(got).all()


def test_location_instability_known_value():
    """Distances 0 and 6 px on two images: std 3; one landmark, a 6 x 8 image (diagonal 10): 0.3."""
    peaks = torch.tensor([[[0.0, 0.0]], [[6.0, 0.0]]])  # (2, 1, 2)
    landmarks = torch.zeros(2, 1, 2)
    got = location_instability(peaks, landmarks, torch.ones(2, 1), image_size=(6, 8))
    assert_close(got, torch.tensor([0.3], dtype=torch.float64))


def test_all_landmarks_skipped_gives_nan():
    peaks, landmarks, weights, valid = _random_instance()
    got = location_instability(peaks, landmarks, weights, image_size=32, valid=torch.zeros_like(valid))
    assert torch.isnan(got).all()
    one_image = location_instability(peaks[:1], landmarks[:1], weights[:1], image_size=32, valid=valid[:1])
    assert torch.isnan(one_image).all()  # k = min(k, N) = 1: no spread


def test_peak_on_the_centre_is_perfectly_stable():
    peaks, landmarks, weights, valid = _random_instance()
    got = location_instability(landmarks[:, :1], landmarks[:, :1], weights[:, :1], image_size=32)
    assert got.tolist() == [0.0]


def test_floor_and_chance_on_the_shapes_keypoints():
    """A filter firing on the unit holding the object's centre scores its quantisation floor, far below chance."""
    s = load_split("test", "smoke")
    assert {"keypoints", "keypoint_valid", "image"} <= set(s)
    kp, valid = s["keypoints"], s["keypoint_valid"]  # (N, 7, 2), (N, 7)
    n, size, h = len(kp), s["image"].shape[-1], 8  # 32 px images, an 8 x 8 map: 4 px per unit
    assert kp.shape == (n, 7, 2) and valid.shape == (n, 7) and size == 32 and valid[:, 0].all()

    floor = quantised_landmark_peaks(kp, h, h, size)  # (N, 1, 2)
    assert floor.shape == (n, 1, 2)
    assert ((floor - kp[:, :1]).abs() <= size / h / 2).all()  # within half a unit of the centre
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(n, 3, h, h, generator=g)  # filter 0 planted on the centre's unit, 1 and 2 noise
    i, j = ((floor[:, 0] + 0.5) / (size / h) - 0.5).round().long().unbind(1)[::-1]
    maps[torch.arange(n), 0, i, j] = 1.0 + torch.rand(n, generator=g)
    peaks, weights = peak_positions(maps, size)
    assert_close(peaks[:, :1], floor, rtol=0, atol=0)

    planted = location_instability(peaks, kp, weights, image_size=size, valid=valid)
    expected_floor = location_instability(floor, kp, weights[:, :1], image_size=size, valid=valid)
    assert_close(planted[:1], expected_floor)
    centre_only = location_instability(floor, kp[:, :1], weights[:, :1], image_size=size)
    # distances to the centre lie in [0, 2√2] px: std <= √2 px, over a diagonal of 32√2 px
    assert 0 < centre_only.item() < 1 / 32

    random_peaks, random_weights = chance_peaks(n, 32, h, h, size, generator=g)
    chance = location_instability(random_peaks, kp, random_weights, image_size=size, valid=valid)
    ratio = planted[0] / chance.nanmean()
    assert planted[0] < 0.4 * chance.min() and ratio < 0.3, (planted, chance.nanmean())
    assert 0.1 < chance.nanmean() < 0.2  # a random unit of the image


def test_top_k_selects_the_strongest_images():
    """Stable on its 10 strongest images and wild on the other 10: low with those weights, high reversed."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, k = 20, 10
    landmarks = torch.rand(n, 3, 2, generator=g, dtype=torch.float64) * 64
    peaks = landmarks[:, :1] + torch.tensor([5.0, -3.0], dtype=torch.float64)  # a fixed offset from landmark 0...
    landmarks[:, 1:] = landmarks[:, :1] + torch.tensor([[2.0, 7.0], [-4.0, 1.0]], dtype=torch.float64)  # rigid
    peaks[k:] = torch.rand(n - k, 1, 2, generator=g, dtype=torch.float64) * 64  # ...but anywhere on the weak images
    weights = torch.linspace(2.0, 1.0, n, dtype=torch.float64)[:, None]  # the stable images are the strongest
    stable = location_instability(peaks, landmarks, weights, k, image_size=64)
    wild = location_instability(peaks, landmarks, -weights, k, image_size=64)
    assert stable.item() < 1e-9 and wild.item() > 0.1
    assert location_instability(peaks, landmarks, weights, n, image_size=64).item() > 0.1  # k = N: all of them


def test_invariances():
    peaks, landmarks, weights, valid = _random_instance(n=15, f=6, seed=3)
    base = location_instability(peaks, landmarks, weights, 6, image_size=(24, 40), valid=valid)
    images = torch.randperm(15, generator=torch.Generator().manual_seed(1))
    shuffled = location_instability(peaks[images], landmarks[images], weights[images], 6, image_size=(24, 40),
                                    valid=valid[images])
    assert_close(shuffled, base, equal_nan=True)
    filters = torch.tensor([4, 2, 0, 5, 1, 3])
    assert_close(location_instability(peaks[:, filters], landmarks, weights[:, filters], 6, image_size=(24, 40),
                                      valid=valid), base[filters], equal_nan=True)
    landmark_order = torch.tensor([2, 0, 3, 1])
    assert_close(location_instability(peaks, landmarks[:, landmark_order], weights, 6, image_size=(24, 40),
                                      valid=valid[:, landmark_order]), base, equal_nan=True)


def test_chance_peaks_are_unit_centres():
    g = torch.Generator().manual_seed(0)
    peaks, weights = chance_peaks(50, 4, 3, 5, (12, 20), generator=g)
    assert peaks.shape == (50, 4, 2) and weights.shape == (50, 4)
    centres = unit_centres(3, 5, (12, 20))
    assert (peaks[:, :, None] == centres).all(-1).any(-1).all()  # every peak is some unit's centre
    assert len(torch.unique(peaks.view(-1, 2), dim=0)) == 15  # and 200 draws hit all 15 units
    assert ((weights >= 0) & (weights < 1)).all()
    again, _ = chance_peaks(50, 4, 3, 5, (12, 20), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, peaks)


def test_quantised_landmark_peaks_known():
    landmarks = torch.tensor([[[0.0, 0.0]], [[3.4, 3.6]], [[31.0, 16.0]], [[-5.0, 99.0]]])  # (4, 1, 2)
    got = quantised_landmark_peaks(landmarks, 4, 8, (16, 32))  # 4 px per unit: centres 1.5, 5.5, ...
    assert got.tolist() == [[[1.5, 1.5]], [[1.5, 5.5]], [[29.5, 13.5]], [[1.5, 13.5]]]  # outside: clamped


# ------------------------------------------------------------------------------------------------------ devices


def test_devices(device):
    """Every function keeps to its inputs' device (or the one it is given) and agrees with the CPU."""
    peaks, landmarks, weights, valid = _random_instance()
    filled = landmarks.nan_to_num()  # for valid=None: every landmark counts, so none may be NaN
    maps, _, _ = _planted_maps(torch.bfloat16)
    on = [t.to(device) for t in (peaks, landmarks, weights, valid, maps, filled)]
    gen = torch.Generator(device=device).manual_seed(0)
    with stray_tensor_guard():
        got = location_instability(*on[:3], 5, image_size=(24, 40), valid=on[3])
        got_all = location_instability(on[0], on[5], on[2], 5, image_size=(24, 40))
        got_peaks = peak_positions(on[4], (16, 20))
        centres = unit_centres(4, 5, 32, device=device)
        chance = chance_peaks(6, 3, 4, 5, 32, generator=gen, device=device)
        chance_gen = chance_peaks(6, 3, 4, 5, 32, generator=gen)  # the generator's device
        floor = quantised_landmark_peaks(on[1], 4, 5, 32)
    for t in (got, got_all, *got_peaks, centres, *chance, *chance_gen, floor):
        assert t.device.type == device.type
    assert_close(got.cpu(), location_instability(peaks, landmarks, weights, 5, image_size=(24, 40), valid=valid))
    assert_close(got_all.cpu(), location_instability(peaks, filled, weights, 5, image_size=(24, 40)))
    assert_close([t.cpu() for t in got_peaks], list(peak_positions(maps, (16, 20))))
    assert_close(centres.cpu(), unit_centres(4, 5, 32))
    assert_close(floor.cpu(), quantised_landmark_peaks(landmarks, 4, 5, 32))
    assert chance[0].shape == (6, 3, 2) and chance[1].shape == (6, 3) and floor.shape == (12, 1, 2)


def test_on_mask_reads_the_nearest_pixel(device):
    masks = torch.zeros(2, 8, 10, dtype=torch.bool, device=device)
    masks[0, 2, 7] = True  # row (y) 2, column (x) 7
    masks[1, 7, 0] = True
    peaks = torch.tensor([[[7.0, 2.0], [6.6, 2.4], [7.0, 3.0]],  # on, on (rounds to 7, 2), off
                          [[0.0, 7.0], [-3.0, 9.0], [9.0, 0.0]]], device=device)  # on, clamped onto it, off
    with stray_tensor_guard():
        hit = on_mask(peaks, masks)
    assert hit.device.type == device.type
    assert hit.tolist() == [[True, True, False], [True, True, False]]
    with pytest.raises(ValueError, match="same N"):
        on_mask(peaks, masks[:1])


# ------------------------------------------------------------------------------------------------------- errors


def test_peak_positions_errors():
    with pytest.raises(ValueError, match=r"\(N, F, h, w\)"):
        peak_positions(torch.zeros(3, 4, 4), 16)
    with pytest.raises(ValueError, match="NaN or Inf"):
        peak_positions(torch.full((1, 1, 2, 2), torch.inf), 16)
    with pytest.raises(ValueError, match="no units"):
        peak_positions(torch.zeros(1, 1, 0, 2), 16)
    with pytest.raises(ValueError, match="image_size"):
        peak_positions(torch.zeros(1, 1, 2, 2), (16, 0))


def test_location_instability_errors():
    peaks, landmarks, weights, valid = _random_instance()  # N = 12, F = 5, L = 4
    cases = [
        (dict(peaks=peaks[:, :, 0]), "peaks must be a tensor with 3 dims"),
        (dict(weights=weights[:, :, None]), "weights must be a tensor with 2 dims"),
        (dict(peaks=peaks[..., :1]), "must end in 2"),
        (dict(landmarks=torch.cat([landmarks, landmarks[..., :1]], -1)), "must end in 2"),
        (dict(landmarks=landmarks[:10], valid=valid[:10]), "number of images N"),
        (dict(weights=weights[:10]), "number of images N"),
        (dict(weights=weights[:, :4]), r"need \(N, F\)"),
        (dict(valid=valid[:, :3]), r"valid must be a bool tensor \(N, L\)"),
        (dict(valid=valid.float()), r"valid must be a bool tensor \(N, L\)"),
        (dict(k=1), "k must be an int >= 2"),
        (dict(peaks=peaks.index_put((torch.tensor(0),), torch.tensor(torch.nan))), "peaks or weights"),
        (dict(weights=weights.index_put((torch.tensor(3),), torch.tensor(torch.inf))), "peaks or weights"),
        (dict(valid=torch.ones_like(valid)), "where valid is True"),
        (dict(image_size=(24, -1)), "image_size"),
    ]
    for change, match in cases:
        args = dict(peaks=peaks, landmarks=landmarks, weights=weights, k=5, image_size=32, valid=valid) | change
        with pytest.raises(ValueError, match=match):
            location_instability(**args)


def test_other_errors():
    with pytest.raises(ValueError, match="map size"):
        unit_centres(0, 4, 32)
    with pytest.raises(ValueError, match="image_size"):
        unit_centres(4, 4, (32, 32, 3))
    with pytest.raises(ValueError, match="map size"):
        chance_peaks(4, 2, 4, -1, 32)
    with pytest.raises(ValueError, match=r"\(N, L, 2\)"):
        quantised_landmark_peaks(torch.zeros(4, 2), 4, 4, 32)
    with pytest.raises(ValueError, match="landmark 0"):
        quantised_landmark_peaks(torch.full((2, 1, 2), torch.nan), 4, 4, 32)
