"""``evaluate_encoder``: the whole evaluation of one encoder on the smoke profile, cached and reused."""

import math

import pytest
import torch

from nemu_lib import evaluation as ev
from nemu_lib import report
from nemu_lib.config import get_profile
from nemu_lib.encoders import SmallResNet


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


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
    assert result.ns[-1] == e["relax_masks"] and result.convergence.shape == (len(result.ns), n_ceiling)
    assert set(result.worth) == set(ev.DECODER_METHODS)
    assert set(result.sanity) == set(ev.METHODS) - {"random"}
    assert result.mosaic_share.shape == result.mosaic_top.shape == (4 * e["mosaics"],)
    assert ((result.mosaic_share >= 0) & (result.mosaic_share <= 1)).all()
    assert result.seconds["encoder"] > 0 and result.seconds["RELAX"] > result.seconds["encoder"]
    assert "| NEM-U |" in result.markdown


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
    assert path.stat().st_mtime_ns == stamp  # RELAX and the other encoder-only methods did not run again
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
