"""Vision Transformers as encoders: torchvision's ``VisionTransformer`` behind the :class:`Encoder` interface.

A ViT (Dosovitskiy et al., "An image is worth 16x16 words", ICLR 2021) cuts the image into p x p patches,
embeds each with one strided conv, prepends a class token and adds positional embeddings, then runs L
pre-norm transformer blocks and a final LayerNorm::

    t_0 = [c; E x_1; …; E x_N] + P           (N = H/p · W/p patch tokens, D channels)
    t_l = t_{l-1} + MSA(LN(t_{l-1})),  t_l = t_l + MLP(LN(t_l))      l = 1 … L
    z = LN(t_L)[0]  (pool "cls", DINO's choice)   or   mean_i LN(t_L)[i], i ≥ 1  (pool "mean")

The taps are the patch tokens after chosen blocks, laid back on their grid ``(B, D, H/p, W/p)``: every map
has stride p, a single-stride pyramid (the U-net decoder of :mod:`nemu_lib.nem` adds upsampling levels for
it). The forward here is its own, not ``model.forward`` (which asserts the training image size): the
positional embeddings are interpolated bicubically to the image's patch grid (Dosovitskiy et al. §3.2;
DINO's ``interpolate_pos_encoding``), so any size that is a multiple of p works, square or not.

Pretrained weights (:func:`load_pretrained_vit`): DINO's ViT-S/16 and ViT-B/16 (Caron et al., "Emerging
properties in self-supervised vision transformers", ICCV 2021; the authors' releases, timm-style keys mapped
by :func:`timm_to_torchvision`) and torchvision's supervised ViT-B/16. They download once into
``data/weights``; offline, :class:`~nemu_lib.encoders.WeightsUnavailableError` says where to put the file.
A timm ``VisionTransformer`` becomes one with :func:`vit_from_timm` (sizes read from it, weights mapped).

    enc = vit_tiny()                            # random, 64 px, patch 8: for tests and the Shapes scenes
    z, maps = enc.forward_features(x)           # (B, 64), 4 x (B, 64, H/8, W/8)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer, ViT_B_16_Weights

from .config import module_device
from .data import SHAPES_MEAN, SHAPES_STD
from .encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder, download_weights

POOLS = ("cls", "mean")


def default_blocks(layers: int, n: int = 4) -> tuple[int, ...]:
    """``n`` evenly spaced block indices ending with the last: ⌈k L / n⌉ − 1, k = 1 … n (12 blocks: 2, 5, 8, 11)."""
    return tuple(sorted({-(-k * layers // n) - 1 for k in range(1, n + 1)}))


class ViTEncoder(Encoder):
    """A torchvision ``VisionTransformer`` as an encoder: ``z`` from the class token or the patch-token mean.

    Maps (all at stride p): the patch tokens after each block of ``blocks``, ``(B, D, H/p, W/p)``, named
    ``block{i}`` (i as in torchvision's ``encoder_layer_{i}``). The model's classifier ``heads`` is replaced by
    ``nn.Identity`` in place; its other weights are used as they are.

    Args:
        model: a torchvision ``VisionTransformer`` (any sizes; a conv stem works too).
        blocks: 0-based indices of the tapped blocks, negative from the end (default :func:`default_blocks`:
            four evenly spaced, ending with the last); sorted and de-duplicated.
        pool: ``"cls"`` (the final-normed class token) or ``"mean"`` (the mean of the final-normed patch tokens).
        mean, std: the normalisation the model expects (default ImageNet's).

    Inputs of any height and width that are multiples of p (at least p) work; ``min_size = p``.
    """

    def __init__(
        self,
        model: VisionTransformer,
        blocks: Sequence[int] | None = None,
        pool: str = "cls",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        parts = ("conv_proj", "class_token", "encoder", "patch_size", "hidden_dim")
        if not all(hasattr(model, a) for a in parts) or not hasattr(model.encoder, "pos_embedding"):
            raise TypeError(f"expected a torchvision VisionTransformer, got {type(model).__name__}: map other "
                            "ViTs' weights onto one (e.g. timm_to_torchvision for timm / DINO state dicts)")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        n_layers = len(model.encoder.layers)
        blocks = default_blocks(n_layers) if blocks is None else tuple(blocks)
        bad = [b for b in blocks if not -n_layers <= b < n_layers]
        if not blocks or bad:
            raise ValueError(f"unknown block index {bad or 'none'}: this ViT has {n_layers} blocks, "
                             f"choose indices in 0..{n_layers - 1} (negative from the end)")
        model.heads = nn.Identity()
        self.vit = model
        self.blocks = tuple(sorted({b % n_layers for b in blocks}))
        self.pool = pool
        p, d = model.patch_size, model.hidden_dim
        self.patch_size = p
        self.embed_dim = d
        self.feature_channels = (d,) * len(self.blocks)
        self.feature_strides = (p,) * len(self.blocks)
        self.feature_names = tuple(f"block{b}" for b in self.blocks)
        self.min_size = p
        self.in_channels = getattr(model.conv_proj, "in_channels", 3)
        self.mean, self.std = tuple(mean), tuple(std)
        self.config = {"name": "vit", "image_size": model.image_size, "patch_size": p, "layers": n_layers,
                       "hidden": d, "heads": model.encoder.layers[0].num_heads, "mlp": model.mlp_dim,
                       "blocks": list(self.blocks), "pool": pool, "mean": list(self.mean), "std": list(self.std)}
        self._class_tokens: list[Tensor] = []  # the class token after each tapped block, from the last forward

    def pos_embedding(self, grid: tuple[int, int]) -> Tensor:
        """Positional embeddings ``(1, 1 + h w, D)`` for a patch grid ``(h, w)``: the model's own at its native
        grid, else its patch part resized bicubically (align_corners False) and the class token's unchanged."""
        pos = self.vit.encoder.pos_embedding  # (1, 1 + g², D)
        g = math.isqrt(pos.shape[1] - 1)
        if grid == (g, g):
            return pos
        patch = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)  # (1, D, h, w)
        return torch.cat([pos[:, :1], patch.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + h w, D)

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        p, (h, w) = self.patch_size, x.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"x is {h}x{w} px, not a multiple of the patch size {p}: resize or crop it to "
                             f"multiples of {p} (e.g. {h // p * p}x{w // p * p})")
        grid = (h // p, w // p)
        tokens = self.vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, h w, D), row-major over the grid
        cls = self.vit.class_token.expand(len(x), -1, -1).to(tokens.dtype)  # (B, 1, D)
        t = self.vit.encoder.dropout(torch.cat([cls, tokens], dim=1) + self.pos_embedding(grid))  # (B, 1 + h w, D)
        maps, self._class_tokens = [], []
        for i, layer in enumerate(self.vit.encoder.layers[:self.blocks[-1] + 1]):
            t = layer(t)
            if i in self.blocks:
                maps.append(_to_map(t[:, 1:], grid))  # (B, D, h, w)
                self._class_tokens.append(t[:, 0].detach())  # (B, D)
        return self._head(t), maps

    def _head(self, t: Tensor) -> Tensor:
        """The remaining blocks after the last tap, the final norm and the pooling: ``(B, 1 + N, D) -> (B, D)``."""
        for layer in self.vit.encoder.layers[self.blocks[-1] + 1:]:
            t = layer(t)
        t = self.vit.encoder.ln(t)
        return t[:, 0] if self.pool == "cls" else t[:, 1:].mean(dim=1)

    def forward_from(self, index: int, fmap: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the blocks after tap ``index`` on ``fmap (B, D, h, w)``: ``(z, [fmap, later taps…])``.

        The map becomes patch tokens again; the class token at that depth is the one of the **last forward
        pass of the same images** (kept, detached, by ``forward_features``), as in
        :class:`nemu_lib.explainer.Explainer`, which runs ``forward_features(x)`` and then ``forward_from`` on
        its reconstruction. Gradients reach ``fmap``. Call ``forward_features`` on the images first.

        From the last block with ``pool="cls"`` nothing is left to mix the patch tokens into the class token:
        ``z`` is then the kept class token's and does not depend on ``fmap`` (``pool="mean"`` does).
        """
        index %= len(self.blocks)  # -1: the last tap
        if not self._class_tokens:
            raise RuntimeError("forward_from needs the class tokens of a forward pass of the same images: call "
                               "encoder.forward_features(x) first")
        cls = self._class_tokens[index]  # (B, D)
        if cls.shape[0] != fmap.shape[0] or cls.device != fmap.device:
            raise RuntimeError(f"the last forward pass had {cls.shape[0]} images on {cls.device}, fmap has "
                               f"{fmap.shape[0]} on {fmap.device}: call forward_features on fmap's images first")
        grid = (fmap.shape[-2], fmap.shape[-1])
        t = torch.cat([cls[:, None].to(fmap.dtype), fmap.flatten(2).transpose(1, 2)], dim=1)  # (B, 1 + h w, D)
        maps = [fmap]
        for i in range(self.blocks[index] + 1, self.blocks[-1] + 1):
            t = self.vit.encoder.layers[i](t)
            if i in self.blocks:
                maps.append(_to_map(t[:, 1:], grid))
        return self._head(t), maps


def _to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Patch tokens ``(B, h w, D)`` in row-major order back on their grid ``(B, D, h, w)``."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def build_vit(
    name: str = "vit",
    image_size: int = 224,
    patch_size: int = 16,
    layers: int = 12,
    hidden: int = 768,
    heads: int = 12,
    mlp: int = 3072,
    blocks: Sequence[int] | None = None,
    pool: str = "cls",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ViTEncoder:
    """A random-weight :class:`ViTEncoder` of the given sizes; ``build_vit(**encoder.config)`` rebuilds one.

    ``image_size`` is the native size (that of the positional embeddings, ``(image_size / p)² + 1``); the
    defaults are ViT-B/16's.
    """
    if name != "vit":
        raise ValueError(f"build_vit builds 'vit' encoders, got name {name!r}: use nemu_lib.encoders.build_encoder")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}: pick multiples")
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}: pick hidden = heads x head size")
    model = VisionTransformer(image_size, patch_size, layers, heads, hidden, mlp, num_classes=1)
    return ViTEncoder(model, blocks, pool, mean, std)


def vit_tiny(
    image_size: int = 64,
    patch_size: int = 8,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    mlp: int = 128,
    pool: str = "cls",
    blocks: Sequence[int] | None = None,
) -> ViTEncoder:
    """A small random ViT for tests and the Shapes scenes (Shapes normalisation), 0.15 M parameters.

    >>> enc = vit_tiny()
    >>> [tuple(m.shape[1:]) for m in enc.features(torch.zeros(1, 3, 32, 48))]
    [(64, 4, 6), (64, 4, 6), (64, 4, 6), (64, 4, 6)]
    """
    return build_vit("vit", image_size, patch_size, layers, hidden, heads, mlp, blocks, pool, SHAPES_MEAN, SHAPES_STD)


# ------------------------------------------------------------------------------- pretrained weights

_TIMM_BLOCK = {  # timm / DINO block parameter -> torchvision EncoderBlock parameter
    "norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight", "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
}
_TIMM_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj": "conv_proj",
             "norm": "encoder.ln"}


def timm_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a timm-style ViT state dict (DINO's releases) onto torchvision's ``VisionTransformer`` names.

    ``cls_token → class_token``, ``pos_embed → encoder.pos_embedding``, ``patch_embed.proj.* → conv_proj.*``,
    ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.* → encoder.layers.encoder_layer_{i}.{ln_1,
    self_attention.in_proj_{weight, bias}, self_attention.out_proj, ln_2, mlp.0, mlp.3}.*``, ``norm.* →
    encoder.ln.*``. Both fuse q, k, v in that order, so the tensors are unchanged. A classifier ``head.*`` is
    dropped; any other key (registers, layer scale, ``fc_norm``: not a plain ViT) is a ``ValueError``.
    """
    out, unknown = {}, []
    for key, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            i, rest = m.groups()
            new = next((v + rest[len(k):] for k, v in _TIMM_BLOCK.items() if rest == k or rest.startswith(k + ".")),
                       None)
            new = None if new is None else f"encoder.layers.encoder_layer_{i}.{new}"
        else:
            new = next((v + key[len(k):] for k, v in _TIMM_TOP.items() if key == k or key.startswith(k + ".")), None)
        if new is None and not key.startswith("head."):
            unknown.append(key)
        elif new is not None:
            out[new] = value
    if unknown:
        raise ValueError(f"not a plain timm/DINO ViT state dict: unknown keys {unknown[:5]}; map them by hand")
    return out


def vit_from_timm(model: nn.Module, blocks: Sequence[int] | None = None, pool: str = "cls",
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> ViTEncoder:
    """A timm ``VisionTransformer`` (plain: class token, no registers) as a :class:`ViTEncoder` of its weights.

    Sizes are read from the model (patch size, width, depth, heads, MLP width, native image size), the weights
    copied through :func:`timm_to_torchvision`; ``mean``/``std`` default to the model's ``pretrained_cfg``, else
    ImageNet's. timm itself is needed only to build ``model``.
    """
    try:
        proj, first = model.patch_embed.proj, model.blocks[0]
        arch = {"image_size": int(model.patch_embed.img_size[0]), "patch_size": int(proj.kernel_size[0]),
                "layers": len(model.blocks), "hidden": int(proj.out_channels), "heads": int(first.attn.num_heads),
                "mlp": int(first.mlp.fc1.out_features)}
    except AttributeError as err:
        raise ValueError(f"not a timm VisionTransformer ({type(model).__name__}: {err}): build it with "
                         "timm.create_model('vit_...') or wrap a CNN with Encoder.wrap") from None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean or cfg.get("mean", IMAGENET_MEAN)
    std = std or cfg.get("std", IMAGENET_STD)
    encoder = build_vit("vit", blocks=blocks, pool=pool, mean=tuple(mean), std=tuple(std), **arch)
    encoder.to(module_device(model))
    encoder.vit.load_state_dict(timm_to_torchvision(model.state_dict()))
    return encoder.train(model.training)


_S16 = {"patch_size": 16, "layers": 12, "hidden": 384, "heads": 6, "mlp": 1536}
_B16 = {"patch_size": 16, "layers": 12, "hidden": 768, "heads": 12, "mlp": 3072}

# name: (architecture, key layout, URL). DINO's are the authors' backbone releases (their torch.hub entries).
PRETRAINED_VITS = {
    "vit-s16-dino": (_S16, "timm", "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
    "vit-b16-dino": (_B16, "timm", "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
    "vit-b16-supervised": (_B16, "torchvision", ViT_B_16_Weights.IMAGENET1K_V1.url),
}


def load_pretrained_vit(
    name: str, blocks: Sequence[int] | None = None, pool: str = "cls", progress: bool = True
) -> ViTEncoder:
    """A pretrained ViT by name (see :data:`PRETRAINED_VITS`) as a :class:`ViTEncoder`, in eval mode.

    Weights download once (``torch.hub.load_state_dict_from_url``, loaded with ``weights_only=True``) into
    ``data_dir() / "weights"``; a file already there is used without network. Offline without the file, raises
    :class:`~nemu_lib.encoders.WeightsUnavailableError` naming the file, URL and folder. Native size 224 px
    (ImageNet normalisation); other multiples of 16 work through the interpolated positional embeddings.
    """
    if name not in PRETRAINED_VITS:
        raise ValueError(f"unknown pretrained ViT {name!r}: choose one of {sorted(PRETRAINED_VITS)}")
    arch, layout, url = PRETRAINED_VITS[name]
    state = download_weights(name, url, progress, "Offline, use vit_tiny() (random weights) or the Shapes encoders "
                                                  "trained in notebook 01 (nemu_lib.ssl.pretrained_encoder).")
    encoder = build_vit("vit", 224, blocks=blocks, pool=pool, **arch)
    if layout == "timm":
        state = timm_to_torchvision(state)
    state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    try:
        encoder.vit.load_state_dict(state)
    except RuntimeError as err:  # missing, unexpected or mis-shaped keys: another architecture
        raise ValueError(f"{name} weights do not fit a torchvision ViT of {arch}: {err}") from err
    return encoder.eval()
