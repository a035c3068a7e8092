"""nemu_lib.vit: taps where their patches are, z against torchvision's own forward and by hand, any size that
is a multiple of p, forward_from, the project's tools on token maps, DINO's keys, offline pretrained loaders."""

import json
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from conftest import stray_tensor_guard
from torch import Tensor, nn
from torch.testing import assert_close
from torchvision.models.vision_transformer import VisionTransformer

import nemu_lib.encoders
from nemu_lib.data import concept_masks, load_split, normalize
from nemu_lib.dissection import dissect, layer_names
from nemu_lib.encoders import WeightsUnavailableError
from nemu_lib.nem import NEMU
from nemu_lib.relax import relax
from nemu_lib.train import TrainConfig, train
from nemu_lib.vit import (
    PRETRAINED_VITS,
    ViTEncoder,
    build_vit,
    default_blocks,
    load_pretrained_vit,
    timm_to_torchvision,
    vit_tiny,
)

P = 8  # the patch size of every tiny ViT here


def _randomise(model: nn.Module, seed: int = 1) -> None:
    """A nonzero class token and biases: torchvision starts them at 0 (or ~1e-6), which hides mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("class_token") or name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _vit(pool: str = "cls", blocks=None, layers: int = 3, seed: int = 0) -> ViTEncoder:
    torch.manual_seed(seed)
    enc = vit_tiny(image_size=32, patch_size=P, layers=layers, hidden=32, heads=4, mlp=64, pool=pool, blocks=blocks)
    _randomise(enc)
    return enc.eval()


def _tokens_in(model: VisionTransformer, x: Tensor) -> Tensor:
    """Class token and patch embeddings ``(B, 1 + N, D)``, before the positional embeddings (by hand)."""
    patches = model.conv_proj(x).flatten(2).transpose(1, 2)
    return torch.cat([model.class_token.expand(len(x), -1, -1), patches], dim=1)


def _reference(model: VisionTransformer, x: Tensor, blocks) -> tuple[Tensor, list[Tensor]]:
    """torchvision's own ``model.encoder`` (positional embeddings, blocks, final norm) at any multiple of p, with
    its positional embeddings resized by hand: ``(normed tokens (B, 1 + N, D), [tokens after each block])``."""
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    pos = model.encoder.pos_embedding.detach().clone()
    g = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[0, 1:].T.reshape(1, -1, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].reshape(-1, h * w).T
    taps = []
    hooks = [model.encoder.layers[b].register_forward_hook(lambda m, i, o: taps.append(o)) for b in blocks]
    saved = model.encoder.pos_embedding
    model.encoder.pos_embedding = nn.Parameter(torch.cat([pos[:, :1], grid[None]], dim=1))
    try:
        out = model.encoder(_tokens_in(model, x))
    finally:
        model.encoder.pos_embedding = saved
        for hook in hooks:
            hook.remove()
    return out, taps


# ----------------------------------------------------------------------------- shapes, sizes, references


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (48, 24), (8, 16)])
def test_z_and_taps_have_the_documented_shapes_at_square_and_non_square_sizes(size):
    enc = _vit()
    z, maps = enc.forward_features(torch.randn(2, 3, *size))
    assert z.shape == (2, 32)
    assert [tuple(m.shape) for m in maps] == [(2, 32, size[0] // P, size[1] // P)] * 3
    assert enc.feature_strides == (P, P, P) and enc.feature_channels == (32, 32, 32) and enc.min_size == P
    assert layer_names(enc) == enc.feature_names == ("block0", "block1", "block2")


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("size", [(32, 48), (24, 40), (32, 32)])
def test_z_and_taps_equal_torchvisions_encoder_with_resized_positional_embeddings(pool, size):
    enc = _vit(pool, blocks=(0, 2))
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        z, maps = enc.forward_features(x)
        normed, taps = _reference(enc.vit, x, (0, 2))
    expected = normed[:, 0] if pool == "cls" else normed[:, 1:].mean(dim=1)
    assert_close(z, expected, atol=1e-6, rtol=1e-5)
    for m, t in zip(maps, taps, strict=True):  # map (B, D, h, w) position (r, c) is token 1 + r w + c
        assert_close(m, t[:, 1:].transpose(1, 2).reshape(m.shape))


def test_at_the_native_size_z_is_torchvisions_own_forward():
    enc = _vit()
    model = enc.vit  # heads replaced by nn.Identity: model(x) is the final-normed class token
    assert isinstance(model.heads, nn.Identity)
    taps = []
    for layer in model.encoder.layers:
        layer.register_forward_hook(lambda m, i, o: taps.append(o))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        z, maps = enc.forward_features(x)
    assert_close(z, expected, atol=1e-6, rtol=0)
    for m, t in zip(maps, taps[:3], strict=True):
        assert torch.equal(m, t[:, 1:].transpose(1, 2).reshape(m.shape))


def test_a_bright_patch_lands_on_its_own_token_only():
    """Blocks made identities (their residual branches' output projections zeroed): the token map is the patch
    embedding plus positional embeddings, so a patch changed at (row r, col c) changes map position (r, c) only."""
    enc = _vit()
    with torch.no_grad():
        for layer in enc.vit.encoder.layers:
            for linear in (layer.self_attention.out_proj, layer.mlp[3]):
                linear.weight.zero_()
                linear.bias.zero_()
    x = torch.zeros(1, 3, 32, 48)  # a 4 x 6 patch grid
    r, c = 2, 4
    bright = x.clone()
    bright[..., r * P:(r + 1) * P, c * P:(c + 1) * P] = 3.0
    with torch.no_grad():
        diffs = [(a - b).abs().sum(dim=1)[0] for a, b in zip(enc.features(bright), enc.features(x), strict=True)]
    for d in diffs:  # (4, 6)
        assert d[r, c] > 1
        d[r, c] = 0
        assert d.max() == 0


def test_default_blocks_are_evenly_spaced_and_end_with_the_last():
    assert default_blocks(12) == (2, 5, 8, 11)
    assert default_blocks(4) == (0, 1, 2, 3)
    assert default_blocks(6) == (1, 2, 4, 5)
    assert default_blocks(2) == (0, 1)
    assert _vit(layers=4, blocks=(-1, 1, 1)).blocks == (1, 3)  # negative from the end, sorted, unique


def test_config_is_json_and_rebuilds_the_architecture():
    enc = _vit("mean", blocks=(1,))
    config = json.loads(json.dumps(enc.config))
    assert config == enc.config
    copy = build_vit(**config)
    copy.load_state_dict(enc.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        assert_close(copy.eval()(x), enc(x))
    assert copy.feature_names == ("block1",) and copy.pool == "mean" and copy.mean == enc.mean


# ----------------------------------------------------------------------------- forward_from


@pytest.mark.parametrize(("pool", "index"), [("cls", 0), ("cls", 1), ("mean", -1)])
def test_forward_from_a_tap_continues_the_forward_and_passes_gradients(pool, index):
    enc = _vit(pool, layers=4, blocks=(0, 2, 3))
    x = torch.randn(2, 3, 24, 40)
    z, maps = enc.forward_features(x)
    fmap = maps[index].detach().requires_grad_(True)
    z2, maps2 = enc.forward_from(index, fmap)
    assert_close(z2, z)
    assert len(maps2) == len(maps[index:]) and maps2[0] is fmap
    for a, b in zip(maps2[1:], maps[index:][1:], strict=True):
        assert_close(a, b)
    z2.pow(2).sum().backward()  # not z2.sum(): the sum of a LayerNorm's output does not depend on its input
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0


def test_forward_from_the_last_block_with_the_class_token_ignores_the_map():
    """After the last block nothing mixes the patch tokens into the class token: z is the kept one's."""
    enc = _vit("cls")
    z, _ = enc.forward_features(torch.randn(2, 3, 32, 32))
    assert torch.equal(enc.forward_from(-1, torch.randn(2, 32, 4, 4))[0], z)


def test_forward_from_needs_a_forward_pass_of_the_same_images():
    enc = _vit()
    fmap = torch.randn(2, 32, 4, 4)
    with pytest.raises(RuntimeError, match="call encoder.forward_features"):
        enc.forward_from(0, fmap)
    enc.forward_features(torch.randn(3, 3, 32, 32))
    with pytest.raises(RuntimeError, match="3 images"):
        enc.forward_from(0, fmap)


# ----------------------------------------------------------------------------- errors


def test_a_size_that_is_not_a_multiple_of_p_is_a_clear_error():
    with pytest.raises(ValueError, match="not a multiple of the patch size 8.*24x40"):
        _vit()(torch.randn(1, 3, 30, 44))
    with pytest.raises(ValueError, match="at least 8x8"):
        _vit()(torch.randn(1, 3, 4, 8))


@pytest.mark.parametrize("blocks", [(3,), (0, -4), ()])
def test_unknown_block_index(blocks):
    with pytest.raises(ValueError, match=r"unknown block index.*3 blocks.*0\.\.2"):
        _vit(blocks=blocks)


def test_unknown_pool_and_not_a_vit():
    with pytest.raises(ValueError, match=r"pool must be one of \('cls', 'mean'\), got 'max'"):
        _vit("max")
    with pytest.raises(TypeError, match="torchvision VisionTransformer"):
        ViTEncoder(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- the project's tools


def test_relax_on_a_vit_gives_finite_maps_of_the_input_size():
    enc, x = _vit(), torch.randn(2, 3, 32, 48)
    result = relax(enc, x, n_masks=40, batch_size=20)
    assert result.importance.shape == result.uncertainty.shape == (2, 32, 48)
    assert torch.isfinite(result.importance).all() and torch.isfinite(result.uncertainty).all()


def test_nemu_on_a_vit_trains_and_keeps_z(tmp_path):
    enc = _vit()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    torch.manual_seed(2)
    model = NEMU(enc)
    assert len(model.decoder.up) == 1  # stride 8 -> 4
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-2)
    history = train(model, x, None, cfg, tmp_path, progress=False)
    assert len(history["loss"]) == 3 and all(math.isfinite(v) for v in history["loss"])
    xs = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        z, m = model(xs)
        assert m.shape == (2, 1, 24, 40) and torch.equal(z, enc(xs))
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.config["encoder"] == enc.config


def test_network_dissection_on_token_maps():
    split = load_split("test", "smoke")
    n = 16
    x, labels = normalize(split["image"][:n].float()), concept_masks(split["concepts"][:n])
    assert x.shape[-2:] == labels.shape[-2:] == (32, 32)
    result = dissect(_vit(), x, labels, layers=["block0", "block2"], progress=False)
    assert set(result) == {"block0", "block2"}
    for d in result.values():
        assert d.iou.shape == (32, labels.shape[1]) and torch.isfinite(d.iou).all()
        assert ((d.iou >= 0) & (d.iou <= 1)).all()


# ----------------------------------------------------------------------------- devices and dtypes


def test_forward_forward_from_and_nemu_keep_to_the_device_of_x(device):
    enc = _vit().to(device)
    torch.manual_seed(0)
    model = NEMU(enc).to(device)
    x = torch.randn(2, 3, 24, 40, device=device)  # not the native size: the interpolation path
    with torch.no_grad(), stray_tensor_guard():
        z, maps = enc.forward_features(x)
        z2, _ = enc.forward_from(1, maps[1])
        _, m = model(x)
    assert z.device == z2.device == m.device == x.device
    assert_close(z2, z)


def test_forward_under_cpu_bf16_autocast():
    enc, x = _vit(), torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        z32, _ = enc.forward_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, maps = enc.forward_features(x)
            z2, _ = enc.forward_from(0, maps[0])
            _, m = NEMU(enc)(x)
    assert torch.isfinite(z).all() and all(torch.isfinite(a).all() for a in maps)
    assert F.cosine_similarity(z.float(), z32, dim=1).min() > 0.99
    assert_close(z2, z)
    assert m.shape == (2, 1, 32, 48) and torch.isfinite(m).all()


# ----------------------------------------------------------------------------- DINO's keys, pretrained loaders


def _dino_state(model: VisionTransformer) -> dict[str, Tensor]:
    """torchvision's ViT weights under the DINO release's names, written out key by key."""
    sd = model.state_dict()
    out = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"],
           "patch_embed.proj.weight": sd["conv_proj.weight"], "patch_embed.proj.bias": sd["conv_proj.bias"],
           "norm.weight": sd["encoder.ln.weight"], "norm.bias": sd["encoder.ln.bias"]}
    for i in range(len(model.encoder.layers)):
        tv = f"encoder.layers.encoder_layer_{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{kind}"] = sd[tv + f"ln_1.{kind}"]
            out[f"blocks.{i}.attn.qkv.{kind}"] = sd[tv + f"self_attention.in_proj_{kind}"]
            out[f"blocks.{i}.attn.proj.{kind}"] = sd[tv + f"self_attention.out_proj.{kind}"]
            out[f"blocks.{i}.norm2.{kind}"] = sd[tv + f"ln_2.{kind}"]
            out[f"blocks.{i}.mlp.fc1.{kind}"] = sd[tv + f"mlp.0.{kind}"]
            out[f"blocks.{i}.mlp.fc2.{kind}"] = sd[tv + f"mlp.3.{kind}"]
    return out


def _dino_forward(state: dict[str, Tensor], x: Tensor, heads: int) -> Tensor:
    """DINO's ``VisionTransformer.forward`` (facebookresearch/dino, vision_transformer.py) at its native size,
    from the state dict alone: the final-normed class token."""
    w = state["patch_embed.proj.weight"]
    t = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(len(x), -1, -1), t], dim=1) + state["pos_embed"]
    b, n, d = t.shape

    def ln(v, name):
        return F.layer_norm(v, (d,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    for i in range(sum(k.endswith("attn.qkv.weight") for k in state)):
        blk = f"blocks.{i}."
        qkv = F.linear(ln(t, blk + "norm1"), state[blk + "attn.qkv.weight"], state[blk + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # DINO's Attention
        attn = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(dim=-1)
        a = (attn @ v).transpose(1, 2).reshape(b, n, d)
        t = t + F.linear(a, state[blk + "attn.proj.weight"], state[blk + "attn.proj.bias"])
        hidden = F.gelu(F.linear(ln(t, blk + "norm2"), state[blk + "mlp.fc1.weight"], state[blk + "mlp.fc1.bias"]))
        t = t + F.linear(hidden, state[blk + "mlp.fc2.weight"], state[blk + "mlp.fc2.bias"])
    return ln(t, "norm")[:, 0]


def test_dino_keys_map_onto_torchvision_and_give_dinos_forward():
    torch.manual_seed(4)
    source = VisionTransformer(32, P, 2, 4, 32, 64)
    _randomise(source)
    dino = _dino_state(source)
    dino["head.weight"] = torch.zeros(5, 32)  # a classifier: dropped
    mapped = timm_to_torchvision(dino)
    assert set(mapped) == set(source.state_dict()) - {"heads.head.weight", "heads.head.bias"}
    torch.manual_seed(5)
    target = VisionTransformer(32, P, 2, 4, 32, 64)
    target.heads = nn.Identity()
    target.load_state_dict(mapped)  # strict
    source.heads = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
        assert_close(ViTEncoder(target)(x), _dino_forward(dino, x, heads=4), atol=1e-5, rtol=1e-5)


def test_timm_keys_outside_a_plain_vit_are_a_clear_error():
    state = {"blocks.0.ls1.gamma": torch.ones(1), "reg_token": torch.ones(1), "norm.bias": torch.ones(1)}
    with pytest.raises(ValueError, match=r"unknown keys \['blocks.0.ls1.gamma', 'reg_token'\]"):
        timm_to_torchvision(state)


def test_load_pretrained_vit_offline_names_the_file_url_and_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: False)
    calls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: calls.append(a))
    for name in PRETRAINED_VITS:
        with pytest.raises(WeightsUnavailableError) as info:
            load_pretrained_vit(name, progress=False)
        message, url = str(info.value), PRETRAINED_VITS[name][2]
        assert str(tmp_path / "weights") in message and url in message and url.rsplit("/", 1)[1] in message
        assert "cannot be reached" in message and "internet" in message
    assert calls == []


def test_load_pretrained_vit_failed_download_keeps_the_cause(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: True)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsUnavailableError, match="no route to host") as info:
        load_pretrained_vit("vit-b16-dino", progress=False)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_load_pretrained_vit_unknown_name():
    with pytest.raises(ValueError, match="vit-b16-supervised"):
        load_pretrained_vit("vit-l16-dino")


def test_load_pretrained_vit_maps_a_dino_file_already_on_disk(monkeypatch, tmp_path):
    """A DINO-style ViT-S/16 file in the weights folder loads without network, onto torchvision's names."""
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: pytest.fail("the network was asked"))
    seen = []

    def load(url, model_dir=None, map_location=None, progress=True, weights_only=False, **kwargs):
        seen.append((url, model_dir, weights_only))
        return state

    torch.manual_seed(6)
    reference = VisionTransformer(224, 16, 12, 6, 384, 1536)
    _randomise(reference)
    state = {f"module.{k}": v for k, v in _dino_state(reference).items()}  # a DDP prefix is removed
    (tmp_path / "weights").mkdir()
    url = PRETRAINED_VITS["vit-s16-dino"][2]
    (tmp_path / "weights" / url.rsplit("/", 1)[1]).touch()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load)
    enc = load_pretrained_vit("vit-s16-dino", blocks=(11,), progress=False)
    assert seen == [(url, str(tmp_path / "weights"), True)]
    assert not enc.training and enc.embed_dim == 384 and enc.feature_names == ("block11",)
    reference.heads = nn.Identity()
    x = torch.randn(1, 3, 32, 16)
    with torch.no_grad():
        normed, _ = _reference(reference, x, ())
        assert_close(enc(x), normed[:, 0])


def test_vit_b16_supervised_file_loads_with_torchvisions_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    monkeypatch.setattr(nemu_lib.encoders, "_online", lambda host: True)
    torch.manual_seed(7)
    reference = VisionTransformer(224, 16, 12, 12, 768, 3072)
    state = reference.state_dict()
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: state)
    enc = load_pretrained_vit("vit-b16-supervised", pool="mean", progress=False)
    for k, v in enc.vit.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert enc.config["hidden"] == 768 and enc.config["heads"] == 12 and enc.pool == "mean"


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_a_timm_vit_becomes_a_vit_encoder_with_the_same_representation(pool):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from nemu_lib.vit import vit_from_timm

    torch.manual_seed(0)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=0).eval()
    encoder = vit_from_timm(model, pool=pool)
    assert encoder.config["layers"] == 3 and encoder.config["hidden"] == 32 and encoder.feature_strides[0] == 8
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + 16, 32), final-normed
        z, maps = encoder.forward_features(x)
    want = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)
    assert maps[-1].shape == (2, 32, 4, 4)
    assert timm.__version__
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        vit_from_timm(torch.nn.Linear(2, 2))
