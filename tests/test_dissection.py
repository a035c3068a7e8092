"""nemu_lib.dissection: planted detectors, thresholds against torch.quantile, batching, rotation, Broden, errors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.testing import assert_close

from nemu_lib.broden import load_broden
from nemu_lib.data import ShapesScenes, concept_masks, concept_names, normalize
from nemu_lib.dissection import (
    Dissection,
    RotatedUnits,
    TailQuantile,
    best_by_category,
    concept_shares,
    detectors_per_layer,
    dissect,
    iou_ceiling,
    layer_names,
    random_rotation,
    totals,
    unique_concepts,
    unit_masks,
)
from nemu_lib.encoders import Encoder, SmallResNet
from nemu_lib.real_data import DatasetUnavailableError


class Planted(Encoder):
    """A toy 'encoder' whose input already holds its units: features(x) = [x] at full resolution."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.in_channels, self.embed_dim, self.min_size = units, units, 1
        self.feature_channels, self.feature_strides = (units,), (1,)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return x.mean(dim=(2, 3)), [x]


@pytest.fixture(scope="module")
def scenes() -> dict[str, Tensor]:
    s = ShapesScenes("val", size=40, image_size=32).stack(progress=False)
    return {"x": normalize(s["image"]), "labels": concept_masks(s["concepts"])}  # (40, 18, 32, 32) bool


@pytest.fixture(scope="module")
def planted(scenes) -> Tensor:
    """Unit k = concept k's mask + tiny noise (ties broken); a last unit of pure noise."""
    g = torch.Generator().manual_seed(0)
    labels = scenes["labels"].float()
    noise = torch.randn(len(labels), 1, *labels.shape[-2:], generator=g)
    return torch.cat([labels + 1e-3 * torch.rand(labels.shape, generator=g), noise], dim=1)  # (40, 19, 32, 32)


def test_planted_units_are_labelled_with_their_concept(scenes, planted):
    labels = scenes["labels"]
    assert labels.flatten(2).any(2).any(0).all(), "every concept must occur in the test scenes"
    r = dissect(Planted(19), planted, labels, progress=False)["tap0"]
    assert r.iou.shape == (19, 18)
    assert r.best_concept[:18].tolist() == list(range(18))
    assert r.best_iou[18] < 0.04 and not r.detectors[18]  # the noise unit detects nothing
    assert r.table()[0]["unit"] < 18 and not r.table()[-1]["detector"]
    # with q = the concept's pixel share, M_k = L_k exactly: IoU = 1
    share = labels.float().mean(dim=(0, 2, 3))  # (18,)
    for k in (0, 7, 12, 15):  # a shape, a colour, a texture, a background
        r = dissect(Planted(19), planted, labels, top_quantile=share[k].item(), progress=False)["tap0"]
        assert r.best_concept[k] == k and r.iou[k, k] == pytest.approx(1.0)


def test_upsampled_layers_match_the_equations_by_hand(scenes):
    """T_k = torch.quantile, M_k = bilinear upsampling > T_k, IoU over the data set: dense, all in memory."""
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 16)).eval()
    x, labels = scenes["x"], scenes["labels"]
    r = dissect(enc, x, labels, layers=["stage2", "stage4"], top_quantile=0.02, batch_size=16, progress=False)
    with torch.no_grad():
        maps = enc.features(x)
    for layer, i in (("stage2", 2), ("stage4", 4)):
        a = maps[i]  # (N, K, h, w), h = 8 or 2
        t = torch.quantile(a.transpose(0, 1).reshape(a.shape[1], -1), 0.98, dim=1)
        m = torch.nn.functional.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False) > t[:, None, None]
        inter = torch.einsum("nkhw,nchw->kc", m.double(), labels.double())
        union = m.double().sum((0, 2, 3))[:, None] + labels.double().sum((0, 2, 3))[None] - inter
        assert_close(r[layer].thresholds, t)
        assert_close(r[layer].iou, inter / union)
        assert (r[layer].iou > 0).any()


def test_detector_counts_by_category(scenes, planted):
    r = dissect(Planted(19), planted, scenes["labels"], progress=False)["tap0"]
    counts = r.counts()
    assert list(counts) == ["shape", "colour", "texture", "background"]
    assert sum(counts.values()) == int(r.detectors.sum())
    assert counts["background"] == 0  # 0.5 % of pixels can never reach IoU 0.04 with a concept of > 12.5 %
    assert r.counts(unique=True) == counts  # one unit per concept here


def test_thresholds_match_torch_quantile(scenes, planted):
    r = dissect(Planted(19), planted, scenes["labels"], batch_size=7, progress=False)["tap0"]
    expected = torch.quantile(planted.transpose(0, 1).reshape(19, -1), 0.995, dim=1)
    assert_close(r.thresholds, expected)
    a = torch.randn(50, 6, 5, 5) * torch.arange(1, 7)[:, None, None]  # 1,250 values per unit
    for q in (0.005, 0.1, 0.5):
        tail = TailQuantile(6, 1250, q)
        for chunk in a.split(11):
            tail.update(chunk)
        assert tail.rate == 1.0
        assert_close(tail.quantile(), torch.quantile(a.transpose(0, 1).reshape(6, -1), 1 - q, dim=1))


def test_streaming_quantile_error_is_as_documented():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(400, 4, 25, 20, generator=g).exp()  # n = 200,000 values per unit, skewed
    values = a.transpose(0, 1).reshape(4, -1)
    q, max_tail = 0.005, 512
    tail = TailQuantile(4, values.shape[1], q, max_tail)
    for chunk in a.split(64):
        tail.update(chunk)
    assert tail.rate < 0.3 and tail.values.shape[1] <= max_tail  # sampled, memory bounded
    estimate = tail.quantile()
    share = (values > estimate[:, None]).double().mean(1)  # the true share above the estimate
    sigma = q * (2 / max_tail) ** 0.5  # the documented standard deviation
    assert ((share - q).abs() < 4 * sigma).all(), share
    assert_close(estimate, torch.quantile(values, 1 - q, dim=1), rtol=0.1, atol=0)
    other = TailQuantile(4, values.shape[1], q, max_tail)  # the sample does not depend on the batching
    for chunk in a.split(97):
        other.update(chunk)
    assert torch.equal(other.quantile(), estimate)


def test_results_do_not_depend_on_batch_size(scenes, planted):
    runs = [dissect(Planted(19), planted, scenes["labels"], batch_size=b, progress=False)["tap0"] for b in (1, 6, 40)]
    for r in runs[1:]:
        assert torch.equal(r.iou, runs[0].iou) and torch.equal(r.top_images, runs[0].top_images)
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 8))
    a, b = (dissect(enc, scenes["x"], scenes["labels"], layers=["stem", "stage3"], batch_size=bs, progress=False)
            for bs in (5, 40))
    uncached = dissect(enc, scenes["x"], scenes["labels"], layers=["stem", "stage3"], batch_size=5, cache_bytes=0,
                       progress=False)  # the encoder runs twice instead of once: same numbers
    for layer in ("stem", "stage3"):
        assert_close(a[layer].thresholds, b[layer].thresholds)
        assert_close(a[layer].iou, b[layer].iou, atol=1e-3, rtol=0)
        assert torch.equal(a[layer].iou, uncached[layer].iou)


def test_layers_labels_and_empty_data_are_checked(scenes, planted):
    enc = SmallResNet(widths=(4, 8, 8, 8))
    assert layer_names(enc) == ("stem", "stage1", "stage2", "stage3", "stage4")
    assert list(dissect(enc, scenes["x"][:4], scenes["labels"][:4], layers=[-1, 1], progress=False)) == [
        "stage4", "stage1"]
    with pytest.raises(ValueError, match="unknown layer 'layer4'.*'stage4'"):
        dissect(enc, scenes["x"], scenes["labels"], layers=["layer4"], progress=False)
    with pytest.raises(ValueError, match="of the same N"):
        dissect(enc, scenes["x"], scenes["labels"][:10], progress=False)
    with pytest.raises(ValueError, match="do not fit images"):
        dissect(enc, scenes["x"], scenes["labels"][..., :16], progress=False)
    with pytest.raises(ValueError, match="empty"):
        dissect(enc, scenes["x"][:0], scenes["labels"][:0], progress=False)
    with pytest.raises(ValueError, match="concept names"):
        dissect(enc, scenes["x"][:4], scenes["labels"][:4], concepts=["a", "b"], progress=False)
    with pytest.raises(ValueError, match="labels"):
        dissect(enc, scenes["x"], progress=False)


def test_labels_at_a_lower_resolution_and_a_dataloader(scenes, planted):
    """Labels at half the image size (Broden's layout): maps are upsampled to the labels, not the images."""
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 8))
    small = scenes["labels"][..., ::2, ::2]
    direct = dissect(enc, scenes["x"], small, layers=["stage2"], progress=False)["stage2"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(scenes["x"], small), batch_size=16)
    via_loader = dissect(enc, loader, layers=["stage2"], progress=False)["stage2"]
    assert direct.concepts == tuple(concept_names())
    assert_close(direct.iou, via_loader.iou)


def test_rotation_keeps_the_information_and_mixes_the_units(scenes):
    q = random_rotation(8, seed=3)
    assert_close(q @ q.T, torch.eye(8), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 8)).eval()
    rot = RotatedUnits(enc, ["stage4"], seed=3)
    x = scenes["x"][:4]
    with torch.no_grad():
        z, maps = enc.forward_features(x)
        z_rot, maps_rot = rot.forward_features(x)
    assert_close(rot.q4, q)
    assert_close(z_rot, z @ q.T)
    assert_close(z_rot.norm(dim=1), z.norm(dim=1))  # an isometry: distances, linear read-outs unchanged
    assert_close(maps_rot[-1], torch.einsum("kj,bjhw->bkhw", q, maps[-1]))
    assert all(torch.equal(a, b) for a, b in zip(maps[:-1], maps_rot[:-1], strict=True))
    assert layer_names(rot) == layer_names(enc)
    assert list(dissect(rot, x, scenes["labels"][:4], layers=["stage4"], progress=False)) == ["stage4"]
    inner = RotatedUnits(enc, ["stage2", 1], seed=0)  # inner layers: z and the other maps stay as they were
    with torch.no_grad():
        z_in, maps_in = inner.forward_features(x)
    assert torch.equal(z_in, z) and torch.equal(maps_in[3], maps[3])
    assert_close(maps_in[2], torch.einsum("kj,bjhw->bkhw", random_rotation(8, seed=1), maps[2]))


def test_broden_offline_error_and_a_tiny_broden_folder(tmp_path):
    with pytest.raises(DatasetUnavailableError, match=r"(?s)internet.*1 GB.*index.csv.*Shapes"):
        load_broden(tmp_path / "broden1_224")
    root = tmp_path / "broden1_224"
    (root / "images").mkdir(parents=True)
    (root / "label.csv").write_text("number,name,category,frequency,coverage,syns\n0,-,,0,0,\n"
                                    "1,red,color(20),20,1.0,\n2,sky,object(30);color(1),30,5.0,\n"
                                    "3,striped,texture(12),12,1.0,\n4,rare,object(2),2,0.1,\n")
    (root / "index.csv").write_text("image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
                                    "a.jpg,train,8,8,4,4,a_color.png,,,,,3\nb.jpg,val,8,8,4,4,,,,,,\n")
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(root / "images" / "a.jpg")
    seg = np.zeros((4, 4, 3), dtype=np.uint8)
    seg[:2, :, 0] = 1  # red in the top half
    seg[2:, :2, 0] = 2  # sky in the bottom-left quarter
    Image.fromarray(seg).save(root / "images" / "a_color.png")
    ds = load_broden(root)
    assert len(ds) == 1 and ds.concept_names == ["color/red", "object/sky", "texture/striped"]  # 'rare' < 10
    image, masks = ds[0]
    assert image.shape == (3, 8, 8) and masks.shape == (3, 4, 4) and masks.dtype == torch.bool
    assert masks[0, :2].all() and not masks[0, 2:].any()
    assert masks[1, 2:, :2].all() and masks[1].sum() == 4
    assert masks[2].all()  # an image-level texture label covers the image


def _toy_result() -> dict:
    """Two layers of three units against concepts shape/a, shape/b, colour/red, IoUs chosen by hand."""
    concepts = ("shape/a", "shape/b", "colour/red")
    iou1 = torch.tensor([[0.05, 0.01, 0.00], [0.00, 0.00, 0.10], [0.02, 0.03, 0.01]], dtype=torch.float64)
    iou2 = torch.tensor([[0.00, 0.06, 0.00], [0.00, 0.07, 0.00], [0.00, 0.00, 0.02]], dtype=torch.float64)
    empty = torch.zeros(3, 1, dtype=torch.long)
    return {name: Dissection(name, concepts, iou, torch.zeros(3), empty)
            for name, iou in (("l1", iou1), ("l2", iou2))}


def test_counts_and_best_iou_of_a_result_by_hand():
    r = _toy_result()  # detectors: l1 units 0 (shape/a) and 1 (colour/red); l2 units 0 and 1 (both shape/b)
    assert totals(r) == {"l1": {"shape": 1, "colour": 1}, "l2": {"shape": 2, "colour": 0}}
    assert detectors_per_layer(r) == [2, 2]
    assert unique_concepts(r) == 3  # shape/a, colour/red, shape/b
    assert best_by_category(r) == {"shape": [0.05, 0.07], "colour": [0.10, 0.02]}


def test_concept_shares_and_the_iou_ceiling_by_hand():
    labels = torch.zeros(2, 2, 10, 10, dtype=torch.bool)
    labels[:, 0, :5] = True  # concept 0 on half the pixels
    labels[0, 1, 0, 0] = True  # concept 1 on 1 of 200 pixels
    share = concept_shares(labels)
    assert_close(share, torch.tensor([0.5, 0.005], dtype=torch.float64))
    assert_close(iou_ceiling(share, 0.005), torch.tensor([0.01, 1.0], dtype=torch.float64))
    assert iou_ceiling(torch.tensor([0.125]), 0.005).item() == pytest.approx(0.04)  # q / 0.04: the last detectable


def test_unit_masks_are_the_masks_dissect_scores(scenes, planted):
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)  # Planted: unit k's map is channel k
    assert unit_masks(Planted(3), x, "tap0", unit=1, threshold=5.5).tolist() == [
        [[False, False], [True, True]], [[True, True], [True, True]]]  # unit 1: 4..7 and 16..19
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 8)).eval()
    r = dissect(enc, scenes["x"], scenes["labels"], layers=["stage3"], progress=False)["stage3"]
    k = int(r.best_iou.argmax())
    c = int(r.best_concept[k])
    m = unit_masks(enc, scenes["x"], "stage3", k, r.thresholds[k])  # (N, 32, 32) for every scene
    lab = scenes["labels"][:, c]
    assert_close((m & lab).sum().double() / (m | lab).sum().double(), r.iou[k, c])
