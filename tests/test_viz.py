"""nemu_lib.viz: each figure draws on a non-interactive backend and holds the panels, scales and outlines it should."""

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported (nemu_lib.viz imports it): no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.contour import QuadContourSet  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from nemu_lib import viz  # noqa: E402
from nemu_lib.data import COLOURS  # noqa: E402

B, H, W = 3, 16, 16


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _square(h: int = H, w: int = W) -> torch.Tensor:
    """A bool mask (H, W) with a square in the middle."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = True
    return m


def _box(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_savefig_writes_a_png_under_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = viz.savefig(fig, "maps", prefix="02")
    assert path == tmp_path / "figures" / "02_maps.png"
    assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert viz.savefig(fig, "plain") == tmp_path / "figures" / "plain.png"


def test_show_image_rgb_grey_and_clipped(device):
    fig, (a, b) = plt.subplots(1, 2)
    image = torch.rand(3, H, W, dtype=torch.float64, device=device) * 1.5  # some values above 1
    im = viz.show_image(a, image, title="x")
    assert isinstance(im, AxesImage) and im.get_array().shape == (H, W, 3)
    assert im.get_array().max() <= 1.0 and a.get_title() == "x" and not a.axison
    grey = viz.show_image(b, _square().to(device))  # a bool mask: grey on [0, 1]
    assert grey.get_array().shape == (H, W) and grey.get_clim() == (0.0, 1.0)
    with pytest.raises(ValueError, match="image must be"):
        viz.show_image(a, torch.rand(2, 3, H, W))


def test_show_map_own_scale_fixed_scale_nan_and_colorbar():
    fig, (a, b) = plt.subplots(1, 2)
    m = torch.rand(H, W, dtype=torch.float64) * 3 - 1
    im = viz.show_map(a, m, title="R")
    assert im.get_clim() == pytest.approx((m.min().item(), m.max().item()))
    assert a.get_title() == "R" and len(fig.axes) == 2
    holed = m.clone()
    holed[0] = float("nan")  # U-RELAX's left-out half, say
    im = viz.show_map(b, holed, cmap="gray", vmin=0.0, vmax=1.0, colorbar=True)
    assert im.get_clim() == (0.0, 1.0) and im.get_cmap().name == "gray"
    assert im.get_cmap().get_bad() == pytest.approx((*to_rgb("lightgrey"), 1.0))
    assert len(fig.axes) == 3  # the colour bar


def test_outline_draws_the_contour_at_one_half():
    fig, ax = plt.subplots()
    cs = viz.outline(ax, _square(), color="cyan", linewidth=0.8, linestyle="dashed")
    assert isinstance(cs, QuadContourSet) and list(cs.levels) == [0.5] and cs in ax.collections
    assert viz.outline(ax, _square().double() * 0.8) is not None  # float masks too
    assert viz.outline(ax, torch.zeros(H, W, dtype=torch.bool)) is None  # empty: no edge, no warning
    assert viz.outline(ax, torch.ones(H, W)) is None
    assert len(ax.collections) == 2


def test_overlay_stretches_a_coarse_map_over_the_image():
    fig, ax = plt.subplots()
    im = viz.overlay(ax, torch.rand(3, H, W), torch.rand(4, 4, dtype=torch.float64), alpha=0.6, mask=_square())
    assert len(ax.images) == 2 and im is ax.images[1] and im.get_alpha() == 0.6
    assert im.get_extent() == pytest.approx(ax.images[0].get_extent())
    assert len(ax.collections) == 1  # the mask's outline


def test_image_grid_panels_titles_and_outlines():
    images = torch.rand(5, 3, H, W)
    fig, axes = viz.image_grid(images, titles=[f"scene {i}" for i in range(5)], ncols=3,
                               masks=_square().expand(5, H, W), suptitle="scenes")
    assert isinstance(fig, Figure) and axes.shape == (2, 3) and len(fig.axes) == 6
    assert [len(ax.images) for ax in axes.flat] == [1, 1, 1, 1, 1, 0]
    assert [len(ax.collections) for ax in axes.flat] == [1, 1, 1, 1, 1, 0]
    assert axes[1, 1].get_title() == "scene 4" and fig._suptitle.get_text() == "scenes"
    fig, axes = viz.image_grid([torch.rand(H, W, dtype=torch.float64), torch.rand(3, 2 * H, 2 * W)])  # mixed
    assert axes.shape == (1, 2) and axes[0, 1].images[0].get_array().shape == (2 * H, 2 * W, 3)


def test_map_grid_rows_columns_outlines_and_colour_maps(device):
    images = torch.rand(B, 3, H, W, device=device)
    maps = {"R": torch.rand(B, H, W, dtype=torch.float64, device=device),
            "U": torch.rand(B, H, W, device=device) * 1e-3,
            "x ⊙ m": torch.rand(B, 3, H, W, device=device)}  # drawn as images
    fig, axes = viz.map_grid(images, maps, titles=["a", "b", "c"], masks=_square().expand(B, H, W).to(device),
                             cmap={"U": "magma"})
    assert axes.shape == (B, 4) and len(fig.axes) == B * 4
    assert all(len(ax.images) == 1 and len(ax.collections) == 1 for ax in axes.flat)  # one outline per panel
    assert [ax.get_title() for ax in axes[0]] == ["a", "R", "U", "x ⊙ m"] and axes[1, 1].get_title() == ""
    assert axes[0, 1].images[0].get_cmap().name == "viridis" and axes[0, 2].images[0].get_cmap().name == "magma"
    assert axes[0, 3].images[0].get_array().shape == (H, W, 3)


def test_map_grid_own_scale_per_panel_and_shared_scale():
    maps = [torch.rand(B, H, W, dtype=torch.float64), 10 + torch.rand(B, H, W)]
    fig, axes = viz.map_grid(torch.rand(B, 3, H, W), maps)
    assert [ax.get_title() for ax in axes[0, 1:]] == ["map 1", "map 2"]
    for i in range(B):
        for j, m in enumerate(maps, start=1):
            assert axes[i, j].images[0].get_clim() == pytest.approx((m[i].min().item(), m[i].max().item()))
    fig, axes = viz.map_grid(torch.rand(B, 3, H, W), maps, shared_scale=True, colorbar=True)
    lo, hi = min(m.min().item() for m in maps), max(m.max().item() for m in maps)
    assert all(ax.images[0].get_clim() == pytest.approx((lo, hi)) for ax in axes[:, 1:].flat)
    assert len(fig.axes) == B * 3 + 1  # one colour bar for the figure
    fig, axes = viz.map_grid(torch.rand(B, 3, H, W), maps, colorbar=True)
    assert len(fig.axes) == B * 3 + B * 2  # one colour bar per map panel
    with pytest.raises(ValueError, match="one entry per image"):
        viz.map_grid(torch.rand(B, 3, H, W), [torch.rand(B + 1, H, W)])


def test_map_grid_transposed_puts_images_in_columns():
    fig, axes = viz.map_grid(torch.rand(4, 3, H, W), {"simclr": torch.rand(4, H, W), "supervised": torch.rand(4, H, W)},
                             transpose=True)
    assert axes.shape == (4, 3)  # indexed [image, column] all the same
    spec = axes[2, 1].get_subplotspec()
    assert (spec.rowspan.start, spec.colspan.start) == (1, 2)  # drawn in row 1 (first map), column 2 (image 2)
    assert axes[0, 1].get_title() == "simclr" and axes[0, 2].get_title() == "supervised"


def test_tile_borders_and_mosaic_figure():
    k, tile = 2, H
    mosaic = torch.rand(3, k * tile, k * tile, dtype=torch.float64)
    fig, axes = viz.mosaic_figure(mosaic, k, maps=torch.rand(4, k * tile, k * tile))
    assert len(axes) == 5 and len(fig.axes) == 5 and all(len(ax.images) == 1 for ax in axes)
    assert _box(axes[0]) == [] and len(axes[0].lines) == 2  # the tile borders only
    for q, ax in enumerate(axes[1:]):
        (box,) = _box(ax)
        r, c = divmod(q, k)
        assert box.get_xy() == (c * tile - 0.5, r * tile - 0.5) and box.get_width() == tile
        assert ax.get_title() == f"query: tile {q + 1}"
    fig, axes = viz.mosaic_figure(mosaic, k, maps=[torch.rand(k * tile, k * tile)], queries=[3], titles=["tile D"])
    assert _box(axes[1])[0].get_xy() == (tile - 0.5, tile - 0.5) and axes[1].get_title() == "tile D"
    fig, ax = plt.subplots()
    assert viz.tile_borders(ax, 3, 8) is None and len(ax.lines) == 4


def test_running_mean_by_hand():
    np.testing.assert_allclose(viz.running_mean([1.0, 2.0, 3.0, 4.0], 2), [1.0, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(viz.running_mean(torch.arange(5.0), 1), np.arange(5.0))


def test_training_curves_smooths_long_curves_and_marks_short_ones():
    loss = torch.rand(50, dtype=torch.float64) + torch.linspace(2, 1, 50, dtype=torch.float64)
    fig, ax = viz.training_curves({"train": loss, "validation": ([10, 20, 30, 40, 50], [2.0, 1.8, 1.5, 1.4, 1.3])},
                                  smooth=20, log=True, title="NEM-U")
    assert isinstance(fig, Figure) and len(ax.lines) == 3  # raw train, its running mean, validation points
    np.testing.assert_allclose(ax.lines[1].get_ydata(), viz.running_mean(loss, 20))
    assert ax.lines[2].get_marker() == "o" and list(ax.lines[2].get_xdata()) == [10, 20, 30, 40, 50]
    assert ax.get_yscale() == "log" and ax.get_title() == "NEM-U" and ax.get_xlabel() == "step"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train (20-step mean)", "validation"]
    fig2, axes = plt.subplots(1, 2)
    out_fig, out_ax = viz.training_curves({"area": [0.5, 0.4, 0.3]}, smooth=1, ylabel="area", ax=axes[1])
    assert out_fig is fig2 and out_ax is axes[1] and len(axes[1].lines) == 1 and axes[1].get_ylabel() == "area"


def test_bars_grouped_stacked_errors_and_log():
    values = {"simclr": [1.0, 2.0, 3.0], "supervised": torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64)}
    fig, ax = viz.bars(values, ["a", "b", "c"], errors={"simclr": [0.1, 0.2, 0.3]}, log=True, rotation=30)
    bars = _box(ax)
    assert len(bars) == 6 and len(ax.containers) == 2 + 1  # two bar containers and one error bar
    centres = [b.get_x() + b.get_width() / 2 for b in bars]
    np.testing.assert_allclose(centres, [-0.2, 0.8, 1.8, 0.2, 1.2, 2.2])
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    fig, ax = viz.bars(values, ["a", "b", "c"], stacked=True, colors={"simclr": "C3"})
    bars = _box(ax)
    assert [b.get_y() for b in bars[3:]] == [1.0, 2.0, 3.0]  # the second series sits on the first
    assert bars[0].get_facecolor()[:3] == pytest.approx(to_rgb("C3"))


def test_concept_map_colours_and_legend():
    fig, (a, b) = plt.subplots(1, 2)
    plane = torch.zeros(H, W, dtype=torch.uint8)
    plane[:4] = 1  # concept 0 of "colour": red
    plane[-4:] = 3  # concept 2: blue
    im = viz.concept_map(a, plane, "colour")
    rgb = im.get_array()
    assert rgb[0, 0].tolist() == pytest.approx(COLOURS["red"]) and rgb[-1, 0].tolist() == pytest.approx(COLOURS["blue"])
    assert rgb[H // 2, 0].tolist() == [1.0, 1.0, 1.0] and a.get_title() == "colour"
    assert [t.get_text() for t in a.get_legend().get_texts()] == ["red", "blue"]
    viz.concept_map(b, plane, "shape", legend=False)
    assert b.get_legend() is None


def test_use_defaults_sets_the_prefix_savefig_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    monkeypatch.setattr(viz, "_PREFIX", [None])
    viz.use_defaults(prefix="03")
    fig, ax = plt.subplots()
    try:
        assert viz.savefig(fig, "loss") == tmp_path / "figures" / "03_loss.png"
        assert viz.savefig(fig, "loss", prefix="04").name == "04_loss.png"  # an explicit prefix wins
        assert plt.rcParams["image.interpolation"] == "nearest"
    finally:
        plt.close(fig)
