"""nemu_lib.wrapped: any CNN as an Encoder (automatic taps, strides, z == model(x)), and through RELAX, NEM-U
and Network Dissection. Random weights only: nothing is downloaded."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import stray_tensor_guard
from torch import nn

from nemu_lib.data import concept_masks, load_split, normalize
from nemu_lib.dissection import dissect, layer_names
from nemu_lib.encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, SmallResNet, TorchvisionResNet
from nemu_lib.nem import NEMU
from nemu_lib.relax import relax
from nemu_lib.train import TrainConfig, train
from nemu_lib.wrapped import WrappedEncoder, node_shapes, wrap

SIZES = [(64, 64), (72, 100)]  # square, and odd non-square
LIGHT = ["mobilenet_v3_small", "resnet18", "small_resnet"]  # the ones the heavier paths run on
ARCHS = [*LIGHT, "efficientnet_b0", "convnext_tiny"]
LAST_STRIDE = {"small_resnet": 16}  # the others: 32
RESNET18_TAPS = ("relu", "layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1")


def make_model(arch: str) -> nn.Module:
    """A classifier with random weights and its head replaced, in eval mode."""
    torch.manual_seed(0)
    if arch == "small_resnet":
        return SmallResNet((8, 16, 32, 64)).eval()  # already an Encoder: wrapped as a module returning z
    model = getattr(torchvision.models, arch)(weights=None)
    if arch == "resnet18":
        model.fc = nn.Identity()
    elif arch == "convnext_tiny":
        model.classifier[2] = nn.Identity()  # keep its LayerNorm2d and Flatten: (B, 768)
    else:
        model.classifier = nn.Identity()
    return model.eval()


@pytest.fixture(scope="module")
def wrapped() -> dict[str, tuple[nn.Module, WrappedEncoder]]:
    """``{arch: (model, wrap(model))}``, built once (read-only: tests that freeze or train build their own)."""
    out = {}
    for arch in ARCHS:
        model = make_model(arch)
        out[arch] = model, wrap(model)
    return out


# ------------------------------------------------------------------------------------------- wrapping

@pytest.mark.parametrize("arch", ARCHS)
def test_automatic_taps_and_z_equal_to_the_model(wrapped, arch):
    model, enc = wrapped[arch]
    n = len(enc.feature_names)
    assert n >= 4 and len(enc.feature_channels) == len(enc.feature_strides) == n
    assert all(a < b for a, b in zip(enc.feature_strides, enc.feature_strides[1:], strict=False))  # fine to coarse
    assert enc.feature_strides[-1] == LAST_STRIDE.get(arch, 32) == enc.min_size
    assert layer_names(enc) == enc.feature_names
    torch.manual_seed(1)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            z, maps = enc.forward_features(x)
            assert torch.equal(z, model(x))
        assert z.shape == (2, enc.embed_dim)
        assert len(maps) == n
        for m, c, s in zip(maps, enc.feature_channels, enc.feature_strides, strict=True):
            assert m.shape[:2] == (2, c)
            assert abs(m.shape[-2] - h / s) < 1 and abs(m.shape[-1] - w / s) < 1  # floor or ceil of H / s


def test_resnet18_taps_are_its_stages_and_match_the_hand_written_encoder(wrapped):
    model, enc = wrapped["resnet18"]
    assert enc.feature_names == RESNET18_TAPS
    assert enc.feature_strides == (2, 4, 8, 16, 32)
    assert enc.feature_channels == (64, 64, 128, 256, 512) and enc.embed_dim == 512
    ref = TorchvisionResNet("resnet18", state_dict=model.state_dict()).eval()
    x = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        z, maps = enc.forward_features(x)
        z_ref, maps_ref = ref.forward_features(x)
    assert torch.equal(z, z_ref)
    for a, b in zip(maps, maps_ref, strict=True):
        assert torch.equal(a, b)


def test_small_resnet_taps_are_its_own_maps(wrapped):
    model, enc = wrapped["small_resnet"]
    assert enc.feature_strides == model.feature_strides and enc.feature_channels == model.feature_channels
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        for a, b in zip(enc.features(x), model.features(x), strict=True):
            assert torch.equal(a, b)


def test_encoder_wrap_is_wrap_and_config_is_json():
    model = make_model("resnet18")
    enc = Encoder.wrap(model, name="rn18")
    assert not enc.training  # the model's mode
    assert isinstance(enc, WrappedEncoder) and enc.feature_names == RESNET18_TAPS
    assert enc.config == {"name": "wrapped", "model": "rn18", "taps": list(RESNET18_TAPS)}
    assert json.loads(json.dumps(enc.config)) == enc.config
    assert wrap(model).config["model"] == "ResNet"


def test_probe_size_does_not_change_the_taps():
    model = make_model("resnet18")
    for probe in (64, (224, 288)):
        enc = wrap(model, probe_size=probe)
        assert enc.feature_names == RESNET18_TAPS and enc.feature_strides == (2, 4, 8, 16, 32)


def test_explicit_taps_module_or_node_names(wrapped):
    model, auto = wrapped["resnet18"]
    enc = wrap(model, ["layer2", "layer4.1.relu_1"])
    assert enc.feature_names == ("layer2", "layer4.1.relu_1") == layer_names(enc)
    assert enc.feature_strides == (8, 32) and enc.feature_channels == (128, 512)
    assert enc.min_size == 32
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps, maps_auto = enc.features(x), auto.features(x)
    assert torch.equal(maps[0], maps_auto[2]) and torch.equal(maps[1], maps_auto[4])
    shallow = wrap(model, ["layer1"])  # min_size stays the model's: its last stage still needs 32 px
    assert shallow.min_size == 32


def test_normalisation_defaults_weights_and_explicit():
    model = make_model("mobilenet_v3_small")
    assert wrap(model).mean == IMAGENET_MEAN and wrap(model).std == IMAGENET_STD
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1  # only its transforms: no download
    enc = wrap(model, weights=weights)
    assert enc.mean == tuple(weights.transforms().mean) and enc.std == tuple(weights.transforms().std)
    enc = wrap(model, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), min_size=48)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25) and enc.min_size == 48
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        wrap(model, mean=(0.5,), std=(0.25,))


def test_wrap_keeps_the_models_mode_and_batchnorm_statistics():
    model = make_model("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = wrap(model)
    assert model.training and enc.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the dry run ran in eval mode: no running statistics moved
    enc.eval()
    assert not model.bn1.training and not model.layer4[1].bn2.training  # the encoder shares the model's layers


def test_a_deep_copy_keeps_the_mode(wrapped):
    _, enc = wrapped["resnet18"]
    copy_ = copy.deepcopy(enc)
    assert not copy_.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(copy_(x), enc(x))  # not a train-mode pass with batch statistics
    assert not copy_.body.bn1.training


def test_node_shapes_lists_the_tap_names():
    shapes = node_shapes(make_model("resnet18"), probe_size=64)
    assert shapes["x"] == (1, 3, 64, 64) and shapes["layer1.1.relu_1"] == (1, 64, 16, 16)
    assert shapes["fc"] == (1, 512) and list(shapes).index("relu") < list(shapes).index("layer4.1.relu_1")


def test_pooled_and_unlearned_nodes_are_never_taps():
    model = make_model("mobilenet_v3_small")
    enc = wrap(model)
    assert "avgpool" not in enc.feature_names and enc.feature_strides == (2, 4, 8, 16, 32)
    vgg = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(7), nn.Flatten())
    enc = wrap(vgg, probe_size=28)  # the adaptive pool's output is 7 x 7, the size of the last map here
    assert enc.feature_names == ("1", "2") and enc.feature_strides == (2, 4)


# ------------------------------------------------------------------------------------------- errors

def test_model_must_return_a_vector():
    convnext = torchvision.models.convnext_tiny(weights=None)
    convnext.classifier = nn.Identity()  # leaves (B, 768, 1, 1)
    with pytest.raises(ValueError, match=r"returns shape \(1, 768, 1, 1\).*needs \(B, D\).*nn.Identity\(\)"):
        wrap(convnext, probe_size=64)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)), y

    with pytest.raises(ValueError, match="returns no single tensor"):
        wrap(Pair(), probe_size=32)


def test_unknown_and_bad_taps(wrapped):
    model, _ = wrapped["resnet18"]
    with pytest.raises(ValueError, match=r"unknown tap 'layer9' of ResNet.*'conv1'.*node_shapes"):
        wrap(model, ["layer1", "layer9"])
    with pytest.raises(ValueError, match="tap 'fc' of ResNet gives \\(1, 512\\), not a map"):
        wrap(model, ["fc"])
    with pytest.raises(ValueError, match="order them fine to coarse"):
        wrap(model, ["layer4", "layer1"])
    with pytest.raises(ValueError, match="distinct"):
        wrap(model, ["layer1", "layer1"])
    with pytest.raises(ValueError, match="twice"):
        wrap(model, ["layer1", "layer1.1.relu_1"])


def test_images_below_min_size(wrapped):
    _, enc = wrapped["resnet18"]
    with pytest.raises(ValueError, match="needs at least 32x32 px"):
        enc(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="has 1 channels but the model takes 3"):
        enc(torch.randn(1, 1, 64, 64))


def test_untraceable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))  # control flow on a value

    with pytest.raises(ValueError, match="torch.fx cannot trace DataDependent.*tracer_kwargs"):
        wrap(DataDependent(), probe_size=32)


# --------------------------------------------------------------------------- through the project's tools

@pytest.mark.parametrize("arch", LIGHT)
def test_relax_on_a_wrapped_encoder(wrapped, arch):
    _, enc = wrapped[arch]
    x = torch.randn(2, 3, 64, 96)
    r = relax(enc, x, n_masks=8, batch_size=8)
    assert r.importance.shape == r.uncertainty.shape == (2, 64, 96)
    assert torch.isfinite(r.importance).all() and torch.isfinite(r.uncertainty).all()


@pytest.mark.parametrize("arch", LIGHT)
def test_nemu_trains_on_a_wrapped_encoder(tmp_path, arch):
    enc = wrap(make_model(arch))  # NEMU freezes it: its own copy
    model = NEMU(enc)
    torch.manual_seed(0)
    images = torch.randn(8, 3, 64, 64)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=0.0)
    history = train(model, images, None, cfg, tmp_path, ckpt_every=2, val_every=100, progress=False)
    assert len(history["loss"]) == 2 and all(torch.isfinite(torch.tensor(history["loss"])))
    assert (tmp_path / "checkpoint.pt").exists()
    model.eval()
    x = torch.randn(2, 3, 72, 100)
    with torch.no_grad():
        z, m = model(x)
        assert torch.equal(z, enc(x))
    assert m.shape == (2, 1, 72, 100) and ((m >= 0) & (m <= 1)).all()


@pytest.mark.parametrize("arch", ["resnet18", "small_resnet"])
def test_dissection_with_tap_names(wrapped, arch):
    _, enc = wrapped[arch]
    split = load_split("test", "smoke")
    x = normalize(F.interpolate(split["image"][:16], size=64, mode="bilinear", align_corners=False),
                  enc.mean, enc.std)  # (16, 3, 64, 64)
    labels = concept_masks(split["concepts"][:16])  # (16, 18, 32, 32): maps are upsampled to them
    tap = enc.feature_names[2]
    result = dissect(enc, x, labels, layers=[tap], progress=False)
    assert list(result) == [tap]
    assert result[tap].iou.shape == (enc.feature_channels[2], labels.shape[1])
    assert torch.isfinite(result[tap].iou).all() and (result[tap].iou >= 0).all()


# ------------------------------------------------------------------------------------- devices and dtype

@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "small_resnet"])
def test_on_the_device_of_the_model(device, arch):
    model = make_model(arch).to(device)
    with stray_tensor_guard():
        enc = wrap(model)  # the dry run's probe is made on the model's device
    x = torch.randn(2, 3, 72, 100, device=device)
    with torch.no_grad(), stray_tensor_guard():
        z, maps = enc.forward_features(x)
    assert z.device.type == device.type and all(m.device.type == device.type for m in maps)
    with torch.no_grad():
        torch.testing.assert_close(z, model(x), rtol=0, atol=0)


def test_bf16_autocast_forward(wrapped):
    _, enc = wrapped["resnet18"]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        z32 = enc(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, maps = enc.forward_features(x)
    assert z.dtype == torch.bfloat16 and all(torch.isfinite(m).all() for m in maps)
    assert F.cosine_similarity(z.float(), z32, dim=1).min() > 0.99


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_timm_cnns_wrap_in_one_call(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0).eval()  # num_classes=0: images -> (B, D)
    encoder = Encoder.wrap(model, probe_size=64)
    assert encoder.feature_strides == (2, 4, 8, 16, 32)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z, maps = encoder.forward_features(x)
        assert torch.equal(z, model(x))
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert [m.shape[1] for m in maps] == list(encoder.feature_channels)
