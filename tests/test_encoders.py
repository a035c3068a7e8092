"""nemu_lib.encoders: the Encoder interface, the small ResNet, torchvision ResNets, pretrained loading."""

import math
import socket
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import nemu_lib.encoders
from nemu_lib import encoders
from nemu_lib.encoders import (
    ENCODERS,
    PRETRAINED,
    Encoder,
    SmallResNet,
    TorchvisionResNet,
    WeightsUnavailableError,
    build_encoder,
    load_pretrained,
)


def _check_interface(enc, x):
    """Shapes, channels, strides and consistency of z / features / forward_features."""
    b, _, h, w = x.shape
    with torch.no_grad():
        z, maps = enc.forward_features(x)
        z_fwd = enc(x)
        maps_again = enc.features(x)
    assert z.shape == (b, enc.embed_dim)
    assert len(maps) == len(enc.feature_channels) == len(enc.feature_strides) == 5
    assert list(enc.feature_strides) == sorted(enc.feature_strides)  # fine to coarse
    for m, c, s in zip(maps, enc.feature_channels, enc.feature_strides, strict=True):
        assert m.shape == (b, c, math.ceil(h / s), math.ceil(w / s))
    assert enc.feature_channels[-1] == enc.embed_dim
    assert torch.equal(z, z_fwd)
    for a, b_ in zip(maps, maps_again, strict=True):
        assert torch.equal(a, b_)
    torch.testing.assert_close(z, maps[-1].mean(dim=(2, 3)))  # z is the pooled last map
    return z, maps


@pytest.mark.parametrize("widths", [(4, 8, 16, 32), (8, 16, 32, 64)])
@pytest.mark.parametrize("hw", [(16, 16), (32, 32), (48, 48), (64, 64), (40, 56), (17, 33)])
def test_small_resnet_shapes(widths, hw):
    torch.manual_seed(0)
    enc = SmallResNet(widths=widths).eval()
    _check_interface(enc, torch.randn(2, 3, *hw))
    assert enc.embed_dim == widths[-1]
    assert enc.feature_channels == (widths[0] // 2, *widths)
    assert enc.feature_strides == (1, 2, 4, 8, 16)


def test_small_resnet_options():
    enc = SmallResNet(widths=(8, 16, 32, 64), blocks=(1, 2, 1, 2), stem_width=6, in_channels=1).eval()
    assert enc.feature_channels == (6, 8, 16, 32, 64)
    assert [len(s) for s in enc.stages] == [1, 2, 1, 2]
    _check_interface(enc, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="four positive"):
        SmallResNet(widths=(8, 16, 32))
    with pytest.raises(ValueError, match="four positive"):
        SmallResNet(blocks=(1, 0, 1, 1))


def test_small_resnet_mean_std_are_shapes_stats():
    from nemu_lib.data import SHAPES_MEAN, SHAPES_STD

    enc = SmallResNet(widths=(4, 8, 16, 32))
    assert enc.mean == SHAPES_MEAN and enc.std == SHAPES_STD
    assert enc.min_size == 16


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return TorchvisionResNet("resnet18").eval()


@pytest.mark.parametrize("hw", [(64, 64), (50, 38)])
def test_resnet18_shapes(resnet18, hw):
    _check_interface(resnet18, torch.randn(2, 3, *hw))
    assert resnet18.feature_channels == (64, 64, 128, 256, 512)
    assert resnet18.feature_strides == (2, 4, 8, 16, 32)
    assert resnet18.embed_dim == 512
    assert resnet18.mean == encoders.IMAGENET_MEAN


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_forward_features_single_pass_small():
    enc = SmallResNet(widths=(4, 8, 16, 32)).eval()
    (stem_calls, _), (last_calls, _) = _count_calls(enc.stem), _count_calls(enc.stages[-1])
    x = torch.randn(2, 3, 32, 32)
    enc.forward_features(x)
    assert (len(stem_calls), len(last_calls)) == (1, 1)
    enc(x)
    enc.features(x)
    assert (len(stem_calls), len(last_calls)) == (3, 3)


def test_forward_features_single_pass_resnet(resnet18):
    body_calls, handle = _count_calls(resnet18.body)
    try:
        resnet18.forward_features(torch.randn(1, 3, 32, 32))
        assert len(body_calls) == 1
    finally:
        handle.remove()  # the encoder is shared by other tests


@pytest.mark.parametrize("which", ["small", "resnet18"])
def test_batch_independence_in_eval(which, resnet18):
    torch.manual_seed(1)
    if which == "small":
        enc = SmallResNet(widths=(8, 16, 32, 64))
        # non-trivial BatchNorm statistics, so that eval mode really uses running stats
        with torch.no_grad():
            enc.train()(torch.randn(8, 3, 32, 32))
        enc.eval()
    else:
        enc = resnet18
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        z_batch, maps_batch = enc.forward_features(x)
        singles = [enc.forward_features(x[i:i + 1]) for i in range(len(x))]
    torch.testing.assert_close(torch.cat([s[0] for s in singles]), z_batch, atol=1e-5, rtol=1e-4)
    for level in range(5):
        torch.testing.assert_close(torch.cat([s[1][level] for s in singles]), maps_batch[level],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("which", ["small", "resnet18"])
def test_bad_inputs(which, resnet18):
    enc = SmallResNet(widths=(4, 8, 16, 32)).eval() if which == "small" else resnet18
    too_small = enc.min_size - 1
    with pytest.raises(ValueError, match="1 channels but the model takes 3"):
        enc(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=f"at least {enc.min_size}x{enc.min_size}"):
        enc(torch.randn(1, 3, too_small, 64))
    x = torch.randn(1, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        enc.features(x)
    with pytest.raises(TypeError, match="floating point"):
        enc.forward_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[None\]"):
        enc(torch.randn(3, 32, 32))
    assert resnet18.min_size == 32


def test_build_encoder_unknown():
    with pytest.raises(ValueError) as info:
        build_encoder("vit_b16")
    for name in ENCODERS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="Encoder.wrap"):
        build_encoder(**Encoder.wrap(SmallResNet((4, 8, 8, 8)), probe_size=32).config)


@pytest.mark.parametrize("name, kwargs", [
    ("small_resnet", {}),
    ("small_resnet", {"widths": (8, 16, 32, 64), "blocks": (1, 2, 1, 1), "stem_width": 5}),
    ("resnet18", {}),
    ("vit", {"image_size": 32, "patch_size": 8, "layers": 2, "hidden": 32, "heads": 2, "mlp": 64, "pool": "mean"}),
])
def test_build_from_config_rebuilds_architecture(name, kwargs):
    enc = build_encoder(name, **kwargs)
    rebuilt = build_encoder(**enc.config)
    assert type(rebuilt) is type(enc)
    assert rebuilt.config == enc.config
    shapes = {k: v.shape for k, v in enc.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(enc.state_dict())  # strict load works


def test_torchvision_weights_reproduce_torchvision():
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    state = reference.state_dict()
    enc = TorchvisionResNet("resnet18", state_dict=state).eval()
    reference.fc = nn.Identity()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), reference(x))
        _, maps = enc.forward_features(x)
        r = reference
        layer4 = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
        torch.testing.assert_close(maps[-1], layer4)
        torch.testing.assert_close(maps[0], r.relu(r.bn1(r.conv1(x))))


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet18"):
        TorchvisionResNet("resnet34")


def test_state_dict_missing_or_unexpected_keys(resnet18):
    state = resnet18.body.state_dict()  # torchvision's keys, without fc
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    with pytest.raises(ValueError, match="do not fit resnet18.*missing.*layer4"):
        TorchvisionResNet("resnet18", state_dict=partial)
    extra = {**state, "head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="unexpected.*head.weight"):
        TorchvisionResNet("resnet18", state_dict=extra)
    # a classifier of another size is ignored
    with_fc = {**state, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
    TorchvisionResNet("resnet18", state_dict=with_fc)


def test_state_dict_wrong_shapes_is_value_error(resnet18):
    """Weights of another architecture must give the documented ValueError, not torch's RuntimeError."""
    state = dict(resnet18.body.state_dict())
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        TorchvisionResNet("resnet18", state_dict=state)


# ---------------------------------------------------------------- pretrained weights


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_load_pretrained_unknown():
    with pytest.raises(ValueError) as info:
        load_pretrained("resnet50-mocov3")
    for name in PRETRAINED:
        assert name in str(info.value)


def test_load_pretrained_unreachable_host_fails_fast(monkeypatch, tmp_path, no_network):
    """Offline (the host does not answer): a clear error before any download is tried."""
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: False)
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: calls.append(a))
    with pytest.raises(WeightsUnavailableError) as info:
        load_pretrained("resnet50-swav", progress=False)
    message = str(info.value)
    assert "dl.fbaipublicfiles.com cannot be reached" in message
    assert str(tmp_path / "weights") in message and "internet" in message
    assert calls == []


def test_load_pretrained_offline(monkeypatch, tmp_path, no_network):
    """The host answers but the download fails: the cause is kept and named."""
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: True)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_pretrained("resnet50-dino", progress=False)
    message = str(info.value)
    assert str(tmp_path / "weights") in message
    assert PRETRAINED["resnet50-dino"][1] in message
    assert "internet" in message
    assert "no route to host" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_load_pretrained_uses_cached_file(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    torch.manual_seed(5)
    reference = torchvision.models.resnet18()
    url = PRETRAINED["resnet18-supervised"][1]
    (tmp_path / "weights").mkdir()
    torch.save(reference.state_dict(), tmp_path / "weights" / Path(url).name)
    enc = load_pretrained("resnet18-supervised", progress=False)
    assert isinstance(enc, TorchvisionResNet)
    assert not enc.training
    loaded = dict(enc.body.named_parameters())
    for k, v in reference.named_parameters():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    for k, v in reference.named_buffers():
        assert torch.equal(enc.body.get_buffer(k), v), k


def _fake_hub(monkeypatch, state, seen):
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: True)
    def load(url, model_dir=None, map_location=None, progress=True, weights_only=False, **kwargs):
        seen.append({"url": url, "model_dir": model_dir, "weights_only": weights_only})
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load)


@pytest.fixture(scope="module")
def resnet50_backbone():
    """A random torchvision ResNet-50's weights without fc, and which keys are parameters."""
    torch.manual_seed(6)
    reference = torchvision.models.resnet50()
    params = {k for k, _ in reference.named_parameters()}
    return {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, params


def test_load_pretrained_swav_style_keys(monkeypatch, tmp_path, no_network, resnet50_backbone):
    """SwAV's release: "module." prefixes plus projection head and prototypes. Also the ResNet-50 shapes."""
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    backbone, params = resnet50_backbone
    swav = {f"module.{k}": v for k, v in backbone.items()}
    swav.update({
        "module.projection_head.0.weight": torch.zeros(2048, 2048),
        "module.projection_head.0.bias": torch.zeros(2048),
        "module.projection_head.3.weight": torch.zeros(128, 2048),
        "module.prototypes.weight": torch.zeros(3000, 128),
    })
    seen = []
    _fake_hub(monkeypatch, swav, seen)
    enc = load_pretrained("resnet50-swav", progress=False)
    assert seen == [{"url": PRETRAINED["resnet50-swav"][1], "model_dir": str(tmp_path / "weights"),
                     "weights_only": True}]
    assert not enc.training
    for k, v in backbone.items():
        tensor = enc.body.get_parameter(k) if k in params else enc.body.get_buffer(k)
        assert torch.equal(tensor, v), k
    # the ResNet-50 interface, once
    assert enc.feature_channels == (64, 256, 512, 1024, 2048)
    assert enc.embed_dim == 2048
    assert enc.config == {"name": "resnet50"}
    _check_interface(enc, torch.randn(1, 3, 64, 64))


def test_load_pretrained_state_dict_wrapper(monkeypatch, tmp_path, no_network, resnet50_backbone):
    """Checkpoints that wrap the weights in {"state_dict": ...} (no fc, as DINO's) load too."""
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    backbone, _ = resnet50_backbone
    _fake_hub(monkeypatch, {"state_dict": backbone}, [])
    enc = load_pretrained("resnet50-dino", progress=False)
    assert torch.equal(enc.body.get_parameter("conv1.weight"), backbone["conv1.weight"])
    assert torch.equal(enc.body.get_parameter("layer4.2.bn3.weight"), backbone["layer4.2.bn3.weight"])
    assert torch.equal(enc.body.get_buffer("layer4.2.bn3.running_var"), backbone["layer4.2.bn3.running_var"])


# ------------------------------------------------------------------------------------------ forward_from


def _randomise_batchnorm(enc: nn.Module, seed: int) -> nn.Module:
    """Statistics and affine weights away from the identity, so that a forward_from that skipped (or doubled) a
    BatchNorm could not reproduce the maps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return enc.eval()


def _encoder_for(name: str) -> Encoder:
    torch.manual_seed(0)
    enc = SmallResNet(widths=(4, 8, 8, 8), blocks=(1, 2, 1, 1)) if name == "small" else TorchvisionResNet(name)
    return _randomise_batchnorm(enc, 1)


@pytest.mark.parametrize(("name", "hw"), [("small", (64, 64)), ("small", (40, 56)), ("resnet18", (64, 64)),
                                          ("resnet18", (50, 38)), ("resnet50", (64, 64))])
def test_forward_from_reproduces_the_maps_above_every_tap(name, hw):
    enc = _encoder_for(name)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z, maps = enc.forward_features(x)
        for i in range(len(maps)):
            z_from, maps_from = enc.forward_from(i, maps[i])
            assert len(maps_from) == len(maps) - i, i
            assert maps_from[0] is maps[i]
            for k, (a, b) in enumerate(zip(maps_from, maps[i:], strict=True)):
                assert torch.equal(a, b), (i, k)
            assert torch.equal(z_from, z), i
        other = enc.forward_from(1, maps[1].flip(-1))[0]  # it runs on the map it is given
    assert not torch.allclose(other, z)


@pytest.mark.parametrize("name", ["small", "resnet18"])
def test_forward_from_passes_gradients_to_the_map(name):
    enc = _encoder_for(name)
    enc.requires_grad_(False)  # as a frozen performer
    with torch.no_grad():
        maps = enc.features(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)))
    for i in range(len(maps)):
        fmap = maps[i].clone().requires_grad_()
        z, later = enc.forward_from(i, fmap)
        (z.square().sum() + later[-1].sum()).backward()
        assert fmap.grad is not None and fmap.grad.shape == fmap.shape, i
        assert torch.isfinite(fmap.grad).all() and fmap.grad.abs().sum() > 0, i
    # the gradient is that of the encoder's own function of the map: a directional derivative, by differences
    fmap, v = maps[2].double(), torch.randn(maps[2].shape, generator=torch.Generator().manual_seed(4)).double()
    enc.double()
    fmap.requires_grad_()
    z = enc.forward_from(2, fmap)[0]
    (g,) = torch.autograd.grad(z.sum(), fmap)
    eps = 1e-6
    with torch.no_grad():
        diff = (enc.forward_from(2, fmap + eps * v)[0].sum() - enc.forward_from(2, fmap - eps * v)[0].sum()) / (2 * eps)
    assert (g * v).sum().item() == pytest.approx(diff.item(), rel=1e-5, abs=1e-8)


def test_base_encoder_forward_from_is_not_implemented():
    class Plain(Encoder):
        feature_channels = (3,)

        def _forward_features(self, x):
            return x.mean(dim=(2, 3)), [x]

    with pytest.raises(NotImplementedError, match="Plain cannot run from an inner map: implement forward_from"):
        Plain().forward_from(0, torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("encoder", [SmallResNet((4, 8, 8, 8)), TorchvisionResNet("resnet18")],
                         ids=["small", "resnet18"])
def test_forward_from_counts_negative_indices_from_the_last_map(encoder):
    encoder.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, maps = encoder.forward_features(x)
        z_last, rest = encoder.forward_from(-1, maps[-1])
        z_two, rest_two = encoder.forward_from(-2, maps[-2])
    assert torch.equal(z_last, z) and len(rest) == 1
    assert torch.equal(z_two, z) and len(rest_two) == 2 and torch.equal(rest_two[1], maps[-1])
