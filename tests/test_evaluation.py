"""The evaluation table: every method on the same scenes, every metric, RELAX's convergence, sanity test."""

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from nemu_lib import evaluation as ev
from nemu_lib.encoders import SmallResNet
from nemu_lib.nem import NEMU
from nemu_lib.relax import relax


def _encoder(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet(widths=(8, 16, 32, 64)).eval()


def _decoders(encoder) -> dict:
    torch.manual_seed(1)
    return {"nem": NEMU(encoder), "nem-contrastive": NEMU(encoder), "relax": NEMU(encoder, uncertainty=True)}


def _x(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


class RegionEncoder(nn.Module):
    """z depends on the top-left quarter only: a known answer for RELAX and the locality metrics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(3 * 8 * 8, 16, bias=False)  # f(0) = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x[:, :, :8, :8].flatten(1)))


def test_explain_all_gives_every_method_at_the_input_size():
    encoder, x = _encoder(), _x()
    maps, seconds = ev.explain_all(encoder, _decoders(encoder), x, n_masks=40, ig_steps=4, progress=False)
    assert tuple(maps) == ev.METHODS and tuple(seconds) == ev.METHODS
    for name, m in maps.items():
        assert m.shape == (3, 32, 32) and torch.isfinite(m).all(), name
        assert seconds[name] > 0
    direct = relax(encoder, x, n_masks=40, seed=0)
    assert_close(maps["RELAX"], direct.importance.float())
    assert_close(maps["U-RELAX"], (direct.importance * direct.u_relax_mask).float())
    assert seconds["U-RELAX"] == seconds["RELAX"]
    with torch.inference_mode():
        assert_close(maps["NEM-U"], _decoders(encoder)["nem"](x)[1][:, 0])
    assert ((maps["random"] >= 0) & (maps["random"] < 1)).all()


def test_explain_all_skips_missing_decoders_and_batching_changes_nothing():
    encoder, x = _encoder(), _x(5)
    decoders = {"nem": _decoders(encoder)["nem"]}
    methods = ("NEM-U", "NEM-U contrastive", "label-free gradient", "label-free IG")
    one, _ = ev.explain_all(encoder, decoders, x, ig_steps=4, batch_size=1, methods=methods, progress=False)
    many, _ = ev.explain_all(encoder, decoders, x, ig_steps=4, batch_size=64, methods=methods, progress=False)
    assert tuple(one) == ("NEM-U", "label-free gradient", "label-free IG")
    for name in one:
        assert_close(one[name], many[name], atol=1e-5, rtol=1e-4)


def test_scores_on_known_maps():
    encoder, x = RegionEncoder(), _x(2, 16)
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[:, :8, :8] = True
    perfect = gt.float() + 0.01 * torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0))
    scores = ev.score_maps(encoder, x, gt, {"perfect": perfect, "reversed": 1 - perfect}, reference=perfect,
                           steps=4, progress=False)
    p, r = scores["perfect"], scores["reversed"]
    assert p["relevance_rank"].tolist() == [1.0, 1.0] and p["pointing_game"].tolist() == [1.0, 1.0]
    assert (p["relevance_mass"] > 0.97).all() and (r["relevance_mass"] < 0.03).all()
    assert_close(p["fidelity_pearson"], torch.ones(2, dtype=torch.float64))
    assert_close(r["fidelity_spearman"], -torch.ones(2, dtype=torch.float64))
    # deleting the region the encoder reads first drops the similarity at once: curves at 0, 1/4, ... 1 are
    # (1, 0, 0, 0, 0) -> AUC 1/8 for the perfect map and (1, 1, 1, 1, 0) -> 7/8 for the reversed one
    assert_close(p["deletion_auc"], torch.full((2,), 0.125, dtype=torch.float64))
    assert_close(r["deletion_auc"], torch.full((2,), 0.875, dtype=torch.float64))
    assert_close(p["insertion_auc"], torch.full((2,), 0.875, dtype=torch.float64))
    # min-max normalisation: adding a constant level (as RELAX's maps have) changes no score
    shifted = ev.score_maps(encoder, x, gt, {"perfect": perfect + 0.9}, reference=perfect, steps=4, progress=False)
    for key, value in shifted["perfect"].items():
        assert_close(value, p[key], atol=1e-5, rtol=1e-5, msg=key)  # float32 rounding of the shift


def test_relax_convergence_merges_chunks_and_approaches_the_reference():
    encoder, x = RegionEncoder(), _x(2, 16)
    reference = relax(encoder, x, n_masks=2000, seed=0).importance
    ns, fid = ev.relax_convergence(encoder, x, reference, n_masks=(20, 2000), seed=10, progress=False)
    assert ns == [20, 2000] and fid.shape == (2, 2)
    first = relax(encoder, x, n_masks=20, seed=10).importance  # the first chunk alone
    assert_close(fid[0], ev.metrics.pearson(first.float(), reference))
    assert (fid[1] > fid[0]).all() and (fid[1] > 0.9).all()


def test_worth_n_masks_by_hand():
    fid = torch.tensor([[0.2, 0.2], [0.6, 0.6]])
    assert ev.worth_n_masks([10, 1000], fid, 0.4) == pytest.approx(100.0)  # halfway on log N
    assert ev.worth_n_masks([10, 1000], fid, 0.1) == 0.0
    assert ev.worth_n_masks([10, 1000], fid, 0.9) == math.inf


def test_with_encoder_keeps_the_decoder_and_swaps_the_encoder():
    trained = _decoders(_encoder())["relax"]
    other = _encoder(seed=7)
    swapped = ev.with_encoder(trained, other)
    assert swapped.encoder is other and swapped.uncertainty
    for k, v in trained.decoder.state_dict().items():
        assert torch.equal(v, swapped.decoder.state_dict()[k])


def test_sanity_check_and_the_table():
    a = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(0))
    rho = ev.sanity_check({"same": a, "random": a}, {"same": a.clone(), "random": torch.rand(4, 8, 8)})
    assert list(rho) == ["same"] and torch.allclose(rho["same"], torch.ones(4, dtype=torch.float64))
    scores = {"m": {"complexity": torch.tensor([1.0, 3.0, math.nan], dtype=torch.float64)}}
    (row,) = ev.summarize(scores, {"m": 0.5})
    assert row["complexity"] == 2.0 and row["complexity_n"] == 2
    assert row["complexity_sem"] == pytest.approx(math.sqrt(2) / math.sqrt(2))
    text = ev.to_markdown([row], keys=("complexity",))
    assert "| m | 2.000 ± 1.000 | 0.5 |" in text and "complexity (entropy) ↓" in text


def test_object_share_and_where_the_maximum_is_by_hand():
    objects = torch.zeros(2, 4, 4, dtype=torch.bool)
    objects[:, 1:3, 1:3] = True  # the centre 2 x 2: K / n = 4 / 16
    assert_close(ev.object_share(objects), torch.full((2,), 0.25, dtype=torch.float64))
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 2], maps[0, 1, 1] = 1.0, 0.995  # maximum on the top border; a second pixel within 1 % of the range
    maps[1] = objects[1].float()  # a plateau of 1 over the object
    st = ev.where_the_maximum_is(maps, objects)
    assert st["argmax on border"] == 0.5  # map 0 yes, map 1 no
    assert st["plateau pixels (median)"] == 2.0  # plateaus of 2 and 4 pixels: torch's median is the lower middle
    assert st["plateau share on object"] == pytest.approx((1 / 2 + 1) / 2)
    assert st["top 1 % share on object"] == 0.5  # the top max(1, 16 // 100) = 1 pixel: off, then on the object


def test_where_the_maximum_is_counts_ties_off_the_border():
    """A maximum shared by a border pixel and an inner one (bilinear upsampling repeats the edge values) is not
    on the border, whichever edge it touches: the share does not change when the maps are flipped."""
    maps = torch.zeros(4, 6, 6)
    maps[0, 0:2, 0:2] = 1.0  # a 2 x 2 tie in the top-left corner: argmax's first index is (0, 0), on the ring
    maps[1, 4:6, 4:6] = 1.0  # the same tie in the bottom-right corner: argmax's first index (4, 4) is off it
    maps[2, 0, 3] = 1.0  # a maximum on the ring alone
    maps[3, 2, 2] = 1.0  # inside
    objects = torch.zeros(4, 6, 6, dtype=torch.bool)
    for dims in ((), (-1,), (-2,), (-2, -1)):
        st = ev.where_the_maximum_is(maps.flip(dims) if dims else maps, objects)
        assert st["argmax on border"] == 0.25, dims  # map 2 only
        assert st["max within 2 px of the edge"] == 0.75, dims  # maps 0, 1 and 2


def test_mean_fidelity_and_worth_in_words():
    scores = {"a": {"fidelity_pearson": torch.tensor([0.2, math.nan, 0.6, 1.0], dtype=torch.float64)},
              "b": {"complexity": torch.ones(4, dtype=torch.float64)}}
    assert ev.mean_fidelity(scores, 3) == {"a": pytest.approx(0.4)}  # the first 3 scenes, NaN left out
    ns = [25, 50, 3000]
    assert ev.describe_worth(0.0, ns) == "< 25 masks"
    assert ev.describe_worth(1234.4, ns) == "1,234 masks"
    assert ev.describe_worth(math.inf, ns) == "> 3000 masks"
