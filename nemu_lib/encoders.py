"""Encoders: one interface for every backbone that nemu explains.

Every encoder maps normalised images ``x (B, C, H, W)`` to a representation ``z (B, D)`` and exposes its
intermediate maps, fine to coarse, for the U-net decoder of NEM-U (Møller et al., ICML 2024) and for
Network Dissection (Bau et al., CVPR 2017)::

    z = encoder(x)                          # (B, D)
    maps = encoder.features(x)              # [(B, C_1, H/s_1, W/s_1), ...], s_1 < s_2 < ...
    z, maps = encoder.forward_features(x)   # both from one pass

Backbones: a small ResNet for 32-128 px scenes (CPU friendly, widths configurable) and torchvision's
ResNet-18 / ResNet-50 (He et al., CVPR 2016) with taps from ``create_feature_extractor``. Pretrained
ResNet-50 weights (torchvision supervised, DINO: Caron et al. ICCV 2021, SwAV: Caron et al. NeurIPS
2020) download once into ``data/weights``; offline, a clear error says where to put the file.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from .checks import check_images
from .config import data_dir
from .data import SHAPES_MEAN, SHAPES_STD
from .real_data import _online

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(nn.Module):
    """Base class. Subclasses set the attributes below and implement ``_forward_features``.

    Attributes:
        embed_dim: D, the size of ``z``.
        feature_channels: channels of each map of ``features(x)``, fine to coarse.
        feature_strides: the downsampling factor of each map.
        min_size: the smallest input side the network takes.
        in_channels: input channels.
        mean, std: the normalisation the encoder expects its inputs in.
        config: keyword arguments that rebuild it with :func:`build_encoder`.
    """

    embed_dim: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]
    min_size: int
    in_channels: int = 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``(z (B, D), [maps fine to coarse])`` from a single pass."""
        check_images(x, channels=self.in_channels, min_size=self.min_size)
        return self._forward_features(x)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]

    def features(self, x: Tensor) -> list[Tensor]:
        return self.forward_features(x)[1]

    def forward_from(self, index: int, fmap: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the encoder on from its map ``index``: ``(z, [fmap, maps index + 1, …])`` given that map.

        What an explainer network feeds its reconstruction to (:mod:`nemu_lib.explainer`); gradients reach
        ``fmap`` through the frozen later stages. Negative indices count from the last map.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run from an inner map: implement forward_from "
                                  "(the stages after map `index`, then the pooling to z)")

    @staticmethod
    def wrap(model: nn.Module, taps: Sequence[str] | None = None, **kwargs) -> Encoder:
        """Any CNN mapping ``(B, C, H, W)`` to ``(B, D)`` as an encoder: :func:`nemu_lib.wrapped.wrap`.

        >>> model = torchvision.models.mobilenet_v3_small(); model.classifier = nn.Identity()
        >>> encoder = Encoder.wrap(model)            # taps: the last node of each resolution
        """
        from .wrapped import wrap  # here, not at the top: nemu_lib.wrapped imports this module

        return wrap(model, taps, **kwargs)


class BasicBlock(nn.Module):
    """Two conv3x3 + BatchNorm with a residual connection (He et al. 2016, Fig. 2)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(Encoder):
    """A ResNet for 32-128 px inputs: a stride-1 stem, then four stages that each halve the resolution.

    Maps (fine to coarse): stem (stride 1), stages 1-4 (strides 2, 4, 8, 16); ``z`` is the global
    average of stage 4, so ``D = widths[-1]``. About 60 M multiply-adds per 64 px image at the default
    widths.

    Args:
        widths: channels of the four stages.
        blocks: residual blocks per stage.
        stem_width: channels of the stem (default ``widths[0] // 2``).
        in_channels: input channels.

    >>> enc = SmallResNet(widths=(8, 16, 32, 64))
    >>> [tuple(m.shape[1:]) for m in enc.features(torch.zeros(1, 3, 32, 32))]
    [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 1, 1),
        stem_width: int | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4 or min(widths) < 1 or min(blocks) < 1:
            raise ValueError(f"widths and blocks need four positive entries, got {widths} and {blocks}")
        stem_width = stem_width or max(widths[0] // 2, 1)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True))
        stages, c_in = [], stem_width
        for width, n in zip(widths, blocks, strict=True):
            stages.append(nn.Sequential(*[BasicBlock(c_in if i == 0 else width, width, 2 if i == 0 else 1)
                                          for i in range(n)]))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.embed_dim = widths[-1]
        self.feature_channels = (stem_width, *widths)
        self.feature_strides = (1, 2, 4, 8, 16)
        self.min_size = 16
        self.in_channels = in_channels
        self.mean, self.std = SHAPES_MEAN, SHAPES_STD
        self.config = {"name": "small_resnet", "widths": list(widths), "blocks": list(blocks),
                       "stem_width": stem_width, "in_channels": in_channels}

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        maps = [self.stem(x)]  # (B, stem_width, H, W)
        for stage in self.stages:
            maps.append(stage(maps[-1]))  # (B, width_i, H / 2^i, W / 2^i)
        z = maps[-1].mean(dim=(2, 3))  # (B, D)
        return z, maps

    def forward_from(self, index: int, fmap: Tensor) -> tuple[Tensor, list[Tensor]]:
        index %= len(self.feature_channels)  # -1: the last map
        maps = [fmap]  # map i is the output of stage i (the stem's for i = 0), so stages[i:] follow it
        for stage in self.stages[index:]:
            maps.append(stage(maps[-1]))
        return maps[-1].mean(dim=(2, 3)), maps


_RESNET_TAPS = {"relu": "stem", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3",
                "layer4": "layer4", "flatten": "z"}
_RESNET_CHANNELS = {"resnet18": (64, 64, 128, 256, 512), "resnet50": (64, 256, 512, 1024, 2048)}


class TorchvisionResNet(Encoder):
    """torchvision's ResNet-18 or ResNet-50 without its classifier; taps after the stem and each stage.

    Maps (fine to coarse): stem ReLU (stride 2), layer1-4 (strides 4, 8, 16, 32); ``z`` is the pooled
    layer4 output (512 or 2048 dims). Expects ImageNet-normalised inputs of at least 32 px.

    Args:
        arch: ``"resnet18"`` or ``"resnet50"``.
        state_dict: optional backbone weights (keys as in torchvision's model; ``fc.*`` ignored).
    """

    def __init__(self, arch: str = "resnet18", state_dict: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        if arch not in _RESNET_CHANNELS:
            raise ValueError(f"unknown arch {arch!r}: choose one of {list(_RESNET_CHANNELS)}")
        model = getattr(torchvision.models, arch)(weights=None)
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            try:
                missing, unexpected = model.load_state_dict(state_dict, strict=False)
            except RuntimeError as err:  # shape mismatches: weights of another architecture
                raise ValueError(f"weights do not fit {arch}: {err}") from err
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(f"weights do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.fc = nn.Identity()
        self.body = create_feature_extractor(model, return_nodes=_RESNET_TAPS)
        self.embed_dim = _RESNET_CHANNELS[arch][-1]
        self.feature_channels = _RESNET_CHANNELS[arch]
        self.feature_strides = (2, 4, 8, 16, 32)
        self.min_size = 32
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.config = {"name": arch}

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.body(x)
        return out["z"], [out[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4")]

    def forward_from(self, index: int, fmap: Tensor) -> tuple[Tensor, list[Tensor]]:
        index %= len(self.feature_channels)  # -1: the last map
        maps = [fmap]
        if index == 0:
            fmap = self.body.maxpool(fmap)
        for name in ("layer1", "layer2", "layer3", "layer4")[index:]:
            for block in getattr(self.body, name).children():  # the feature extractor keeps leaves, not forwards
                fmap = _resnet_block(block, fmap)
            maps.append(fmap)
        return fmap.mean(dim=(2, 3)), maps


def _resnet_block(block: nn.Module, x: Tensor) -> Tensor:
    """torchvision's BasicBlock / Bottleneck forward from its leaf modules (conv1, bn1, …, downsample)."""
    out, i = x, 1
    while hasattr(block, f"conv{i}"):
        out = getattr(block, f"bn{i}")(getattr(block, f"conv{i}")(out))
        i += 1
        if hasattr(block, f"conv{i}"):
            out = torch.relu(out)
    shortcut = x
    if hasattr(block, "downsample"):
        for layer in block.downsample.children():
            shortcut = layer(shortcut)
    return torch.relu(out + shortcut)


ENCODERS = ("small_resnet", "resnet18", "resnet50", "vit")


def build_encoder(name: str, **kwargs) -> Encoder:
    """Build an encoder by name (``small_resnet``, ``resnet18``, ``resnet50``, ``vit``) with random weights.

    ``build_encoder(**encoder.config)`` rebuilds any encoder's architecture (a ViT's with
    :func:`nemu_lib.vit.build_vit`). A wrapped model (:meth:`Encoder.wrap`) cannot be rebuilt from its config:
    rebuild the model and wrap it again.
    """
    if name == "wrapped":
        raise ValueError("a wrapped model cannot be rebuilt from its config: build the model and call Encoder.wrap")
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: choose one of {list(ENCODERS)}")
    if name == "vit":
        from .vit import build_vit  # here, not at the top: nemu_lib.vit imports this module

        return build_vit(name, **kwargs)
    if name.startswith("resnet"):
        return TorchvisionResNet(name, **kwargs)
    return SmallResNet(**kwargs)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable (offline)."""


# name: (architecture, URL). DINO and SwAV are the authors' ResNet-50 releases (their torch.hub entries).
PRETRAINED = {
    "resnet18-supervised": ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url),
    "resnet50-supervised": ("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url),
    "resnet50-dino": ("resnet50", "https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth"),
    "resnet50-swav": ("resnet50", "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"),
}


def download_weights(name: str, url: str, progress: bool = True, offline_hint: str = "") -> dict[str, Tensor]:
    """The state dict at ``url``: from ``data_dir() / "weights"``, or downloaded there once.

    Loaded with ``weights_only=True``; a ``state_dict`` entry is unwrapped and ``module.`` / ``backbone.``
    prefixes are dropped. Offline without the file (or when the download fails) raises
    :class:`WeightsUnavailableError` naming the file, the URL, the folder and ``offline_hint`` (what to use
    instead).
    """
    folder = data_dir() / "weights"
    host = urllib.parse.urlparse(url).hostname
    file = Path(urllib.parse.urlparse(url).path).name

    def unavailable(reason: str) -> WeightsUnavailableError:
        return WeightsUnavailableError(
            f"{name} weights ({file}) are not in {folder} and {reason}. They need internet once; or download {url} "
            f"elsewhere and place it in {folder}.{' ' + offline_hint if offline_hint else ''}"
        )

    if not (folder / file).exists() and not _online(host):
        raise unavailable(f"{host} cannot be reached (offline?)")
    try:
        state = torch.hub.load_state_dict_from_url(url, model_dir=str(folder), map_location="cpu",
                                                   progress=progress, weights_only=True)
    except (urllib.error.URLError, OSError, ConnectionError) as err:
        raise unavailable(f"could not be downloaded ({err})") from err
    state = state.get("state_dict", state)
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_pretrained(name: str, progress: bool = True) -> TorchvisionResNet:
    """A pretrained ResNet by name (see :data:`PRETRAINED`), in eval mode.

    Weights download once (:func:`download_weights`: ``torch.hub.load_state_dict_from_url``, loaded with
    ``weights_only=True``) into ``data_dir() / "weights"``; a file already there is used without network.
    Offline without the file, raises :class:`WeightsUnavailableError` naming the file and folder.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained encoder {name!r}: choose one of {sorted(PRETRAINED)}")
    arch, url = PRETRAINED[name]
    state = download_weights(name, url, progress, "Offline, use the Shapes encoders trained in notebook 01 "
                                                  "(nemu_lib.ssl.pretrained_encoder).")
    state = {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}
    return TorchvisionResNet(arch, state_dict=state).eval()
