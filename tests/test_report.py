"""``evaluate_encoder``: the whole evaluation of one encoder on the smoke profile, cached and reused."""

import math

import pytest
import torch
from torch.testing import assert_close

from nemu_lib import evaluation as ev
from nemu_lib import metrics, report
from nemu_lib.config import get_profile
from nemu_lib.data import mosaic
from nemu_lib.encoders import SmallResNet
from nemu_lib.nem import NEMU


@pytest.fixture(scope="module")
def result(outputs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMU_OUTPUTS", str(outputs))
        return report.evaluate_encoder("random", "smoke", device="cpu", progress=False)


def test_every_method_is_scored_on_the_profile_sizes(result):
    e = get_profile("smoke").extra
    n, n_ceiling = e["eval_images"], e["ceiling_images"]
    assert [row["method"] for row in result.rows] == list(ev.METHODS)
    assert result.images.shape == (n, 3, 32, 32) and result.objects.shape == (n, 32, 32)
    for method, per_metric in result.scores.items():
        assert set(per_metric) >= {"relevance_mass", "complexity", "deletion_auc", "fidelity_pearson"}, method
        assert per_metric["deletion_auc"].shape == (n,) and torch.isfinite(per_metric["deletion_auc"]).all()
    # RELAX's fidelity row is its independent run's agreement, on the ceiling subset only
    relax_fid = result.scores["RELAX"]["fidelity_pearson"]
    assert torch.isfinite(relax_fid[:n_ceiling]).all() and torch.isnan(relax_fid[n_ceiling:]).all()
    assert result.ns[-1] == e["eval_relax_masks"] and result.convergence.shape == (len(result.ns), n_ceiling)
    assert set(result.worth) == set(ev.DECODER_METHODS)
    assert set(result.sanity) == set(ev.METHODS) - {"random"} | {report.RETRAINED}
    assert all(v.shape == (n_ceiling,) for v in result.sanity.values())
    assert set(result.uncertainty) == {"RELAX", "amortised RELAX"}
    assert all(u.shape == (n, 32, 32) and (u >= 0).all() for u in result.uncertainty.values())
    assert result.uncertainty_fidelity.shape == (n,) and torch.isfinite(result.uncertainty_fidelity).all()
    assert result.mosaic_share.shape == result.mosaic_top.shape == (4 * e["mosaics"],)
    assert ((result.mosaic_share >= 0) & (result.mosaic_share <= 1)).all()
    assert result.seconds["encoder"] > 0 and result.seconds["RELAX"] > result.seconds["encoder"]
    assert "| NEM-U |" in result.markdown


def test_the_stricter_randomisation_test_trains_one_decoder_on_the_random_encoder(result, outputs):
    """The random encoder is pretrained_encoder("random"): its decoder is that kind's own, saved once. Here
    the evaluated encoder *is* the random one, so the retrained decoder gives NEM-U's own maps: ρ = 1."""
    assert (outputs / "nemu" / "random-nem-smoke" / "checkpoint.pt").is_file()
    assert_close(result.sanity[report.RETRAINED], torch.ones(len(result.sanity[report.RETRAINED]),
                                                              dtype=result.sanity[report.RETRAINED].dtype))


def test_the_maps_are_cached_and_reused(result, outputs, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(outputs))
    path = outputs / "evaluation" / "random-smoke-seed0.pt"
    stamp = path.stat().st_mtime_ns
    again = report.evaluate_encoder("random", "smoke", device="cpu", progress=False)
    assert path.stat().st_mtime_ns == stamp
    for method, maps in result.maps.items():
        assert torch.equal(maps, again.maps[method]), method
    # the decoders' maps are recomputed (and re-timed): the scores are the same
    timing = ("method", "seconds_per_image")
    assert all(math.isclose(a[k], b[k], rel_tol=1e-9) or (math.isnan(a[k]) and math.isnan(b[k]))
               for a, b in zip(again.rows, result.rows, strict=True) for k in a if k not in timing)


def test_a_retrained_decoder_reuses_the_saved_encoder_maps(result, outputs, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(outputs))
    path = outputs / "evaluation" / "random-smoke-seed0.pt"
    stamp = path.stat().st_mtime_ns
    loaded = report.pretrained_nemu

    def retrained(kind, objective, *args, **kwargs):
        model = loaded(kind, objective, *args, **kwargs)
        if objective == "nem":
            with torch.no_grad():
                model.decoder.head.bias += 1.0  # another NEM-U decoder
        return model

    monkeypatch.setattr(report, "pretrained_nemu", retrained)
    again = report.evaluate_encoder("random", "smoke", device="cpu", progress=False)
    assert path.stat().st_mtime_ns == stamp  # RELAX did not run again
    saved = torch.load(path, weights_only=True)
    assert set(saved["maps"]) == {*report.SAVED_METHODS, "RELAX uncertainty"}  # the one-pass maps are not saved
    assert set(saved["random_maps"]) == set(report.SAVED_METHODS)
    assert not torch.equal(again.maps["NEM-U"], result.maps["NEM-U"])
    assert not torch.equal(again.scores["NEM-U"]["relevance_mass"], result.scores["NEM-U"]["relevance_mass"])
    for method in report.ENCODER_METHODS:
        assert torch.equal(again.maps[method], result.maps[method]), method
    assert torch.equal(again.maps["amortised RELAX"], result.maps["amortised RELAX"])


def test_results_record_holds_the_table_and_headlines(result):
    record = report.results_record([result])
    headline = record["random"]
    assert headline["table"] == result.rows
    assert headline["speedup_nemu_vs_relax"] > 1
    assert -1 <= headline["relax_noise_ceiling_pearson"] <= 1
    assert headline["amortised_relax_uncertainty_median_pearson"] == float(result.uncertainty_fidelity.nanmedian())
    assert headline["amortised_relax_median_pearson"] == float(
        result.scores["amortised RELAX"]["fidelity_pearson"].nanmedian())


def test_mosaic_locality_finds_the_tile_an_encoder_reads():
    """An encoder of the top-left quarter only: explained against the top-left tile, RELAX's importance
    lies on it (the other queries have no answer, so only query 0 is checked)."""

    class TopLeft(SmallResNet):
        def forward(self, x):
            return super().forward(x[:, :, : x.shape[-2] // 2, : x.shape[-1] // 2])

    torch.manual_seed(0)
    encoder = TopLeft(widths=(8, 16, 32, 64)).eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    share, top = report.mosaic_locality(encoder, images, n_mosaics=2, n_masks=200)
    assert share.shape == top.shape == (8,)
    assert top[[0, 4]].all()  # the queried (top-left) tile has the highest mean importance
    assert (share[[0, 4]] > 0.3).all()  # above chance (0.25); the other tiles keep the level of the average s


def test_row_and_speedup(result):
    assert result.row("NEM-U") is result.rows[0] and result.row("random")["method"] == "random"
    with pytest.raises(KeyError, match="no row for 'RISE'"):
        result.row("RISE")
    assert result.speedup == result.seconds["RELAX"] / result.seconds["NEM-U"]
    assert report.results_record([result])["random"]["speedup_nemu_vs_relax"] == result.speedup


def test_randomised_maps_are_those_of_the_randomisation_test(result, outputs, monkeypatch):
    """The same random encoder as evaluate_encoder's: per-scene Spearman ρ as in ``result.sanity``."""
    monkeypatch.setenv("NEMU_OUTPUTS", str(outputs))
    methods = tuple(result.sanity)
    maps = report.randomised_maps("random", "smoke", result.images[:1], device="cpu", methods=methods)
    assert tuple(maps) == methods and all(m.shape == (1, 32, 32) for m in maps.values())
    for method in methods:  # one scene instead of the ceiling subset: RELAX's masks differ, the ρ barely
        trained = result.maps["NEM-U" if method == report.RETRAINED else method][:1]
        rho = metrics.spearman(trained, maps[method]).item()
        assert abs(rho - result.sanity[method][0].item()) < 0.02, method
    encoder = SmallResNet(widths=(8, 16, 32, 64))
    a, b = report.random_encoder_like(encoder, seed=3), report.random_encoder_like(encoder, seed=3)
    assert not a.training and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_mosaic_maps_is_mosaic_locality_for_one_mosaic():
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(8, 16, 32, 64)).eval()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mosaics, sources = mosaic(images, k=2, num=2, generator=torch.Generator().manual_seed(0))
    above, share, top = report.mosaic_maps(encoder, mosaics[0], images[sources[0].flatten()], n_masks=100)
    assert above.shape == (4, 64, 64) and (above.flatten(1).min(1).values == 0).all()
    sums = torch.stack([above[:, :32, :32], above[:, :32, 32:], above[:, 32:, :32], above[:, 32:, 32:]], 1)
    sums = sums.sum((2, 3))  # (4 queries, 4 tiles), row-major
    assert_close(share, sums.diagonal() / sums.sum(1))
    assert torch.equal(top, sums.argmax(1) == torch.arange(4))
    all_share, all_top = report.mosaic_locality(encoder, images, n_mosaics=2, n_masks=100)
    assert_close(all_share[:4], share) and torch.equal(all_top[:4], top)


def test_time_side_by_side():
    torch.manual_seed(0)
    encoder = SmallResNet(widths=(8, 16, 32, 64)).eval()
    x = torch.randn(4, 3, 32, 32)
    seconds = report.time_side_by_side(encoder, NEMU(encoder).eval(), x, n_masks=200, repeats=2)
    assert list(seconds) == ["encoder", "NEM-U", "RELAX"] and all(s > 0 for s in seconds.values())
    assert seconds["RELAX"] > seconds["encoder"]  # 200 masked copies against one pass


def test_saved_maps_are_found_for_the_same_encoder_only(result, outputs, monkeypatch):
    """``saved_maps`` (bench/amortised_relax_curve.py reads notebook 04's RELAX maps with it): this encoder's
    saved maps; nothing for other weights or an evaluation that never ran."""
    monkeypatch.setenv("NEMU_OUTPUTS", str(outputs))
    smoke = get_profile("smoke")
    encoder = report.pretrained_encoder("random", smoke, device="cpu", progress=False)
    saved = report.saved_maps("random", encoder, smoke)
    assert torch.equal(saved["maps"]["RELAX"], result.maps["RELAX"])
    assert saved["ns"] == result.ns and torch.equal(saved["convergence"], result.convergence)
    other = SmallResNet(widths=encoder.config["widths"])  # same architecture, other weights
    assert report.saved_maps("random", other, smoke) is None
    assert report.saved_maps("simclr", encoder, smoke) is None  # no evaluation of that kind saved here
