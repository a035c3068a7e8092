"""SimCLR's augmentations, batched on the device: random resized crop, flip, colour jitter, grayscale, blur.

Chen et al. (ICML 2020, arXiv 2002.05709, Sec. 3 and Appendix A) compose these per image; colour distortion
matters most, because colour histograms alone tell images apart. :class:`SimCLRAugment` draws them for every
image of a batch at once (one ``roi_align`` call, one affine colour map per image, a grouped convolution);
:func:`simclr_transforms` is the same distribution as a per-image ``torchvision.transforms.v2`` pipeline.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms import v2

_GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma; torchvision uses 0.2989 for red (<= 1e-4 apart)


# Hue jitter of SimCLR's views, a share of a turn (0.5: any hue). Chen et al. (ICML 2020, Sec. 3) found colour
# distortion essential because colour histograms alone tell ImageNet images apart; Shapes scenes are more so.
# cpu profile (then 12 epochs, tau 0.2), batch 64, shape probe (random encoder 0.23): 0.29 with hue 0.1, 0.31 with 0.5.
HUE = 0.5


class SimCLRAugment(nn.Module):
    """SimCLR's augmentations, drawn independently for every image of a batch, then normalisation.

    The distribution is torchvision's (see :func:`simclr_transforms`, the per-image ``transforms.v2``
    pipeline with the same parameters), computed batched: the random resized crop in one ``roi_align``
    call, the flip by indexing, colour jitter and grayscale as one affine colour map per image (see
    :meth:`colour_maps`), Gaussian blur as a grouped convolution. On a 2-core CPU this is ~5x faster than
    looping the v2 pipeline over a batch of 256 images at 64 px.

    Args:
        image_size: output side in pixels.
        mean, std: the normalisation applied last (the encoder's).
        scale: range of the crop's area as a share of the image.
        jitter: brightness/contrast/saturation strength.
        hue: the hue strength, a share of a turn. The default, :data:`HUE` = 0.5 (any hue), is stronger than
            the ImageNet recipe's 0.1-0.2: on the Shapes scenes the main object's colour (one of six) and
            the background's two colours tell instances apart without looking at shapes, and with 0.1
            SimCLR learned little else (see ``HUE``).
        p_jitter, p_gray, p_blur: probabilities of colour jitter, grayscale and blur.
        sigma: range of the blur's standard deviation, in pixels.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: float = 0.4,
        hue: float = HUE,
        p_jitter: float = 0.8,
        p_gray: float = 0.2,
        p_blur: float = 0.5,
        sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        super().__init__()
        self.image_size, self.scale, self.jitter, self.hue = image_size, scale, jitter, hue
        self.p_jitter, self.p_gray, self.p_blur, self.sigma = p_jitter, p_gray, p_blur, sigma
        self.register_buffer("mean", torch.tensor(mean)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std)[:, None, None], persistent=False)

    def crop_boxes(self, b: int, h: int, w: int, device: torch.device, tries: int = 10) -> Tensor:
        """Boxes ``(B, 5)`` = (index, x1, y1, x2, y2), drawn as torchvision's RandomResizedCrop does.

        Up to ``tries`` draws of area share ~ U(scale) and log aspect ~ U(log 3/4, log 4/3) per image; the
        first that fits inside the image is kept; if none fits, the largest centred crop with the aspect
        clamped to [3/4, 4/3] (the whole image when its own aspect is in range).
        """
        area = torch.empty(b, tries, device=device).uniform_(*self.scale) * h * w
        ratio = torch.empty(b, tries, device=device).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        ok = (cw <= w) & (ch <= h)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits (0 if none)
        cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
        fallback = ~ok.any(1)
        fw, fh = float(w), float(h)
        if w / h < 3 / 4:
            fh = w / (3 / 4)
        elif w / h > 4 / 3:
            fw = h * (4 / 3)
        cw = torch.where(fallback, torch.full_like(cw, fw), cw).clamp(1, w)
        ch = torch.where(fallback, torch.full_like(ch, fh), ch).clamp(1, h)
        u = torch.where(fallback[:, None], torch.full((b, 2), 0.5, device=device), torch.rand(b, 2, device=device))
        x1, y1 = u[:, 0] * (w - cw), u[:, 1] * (h - ch)
        idx = torch.arange(b, device=device, dtype=torch.float32)
        return torch.stack([idx, x1, y1, x1 + cw, y1 + ch], dim=1)

    def colour_maps(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image affine colour maps ``x -> M x + t``: ``M (B, 3, 3)``, ``t (B, 3)``.

        Colour jitter (with probability ``p_jitter``) composes brightness ``b``, contrast ``c``, saturation
        ``s`` (factors ~ U(1 - jitter, 1 + jitter)) and a hue rotation ``H`` by ~ U(-hue, hue) turns in YIQ
        space: with luma weights ``w`` and ``1 = (1, 1, 1)``, ``S = s I + (1 - s) 1 w^T`` and the image's
        mean luma ``g``, ``M = H S c b`` and ``t = (1 - c) b g 1`` (``S 1 = H 1 = 1``). Grayscale (with
        probability ``p_gray``) left-multiplies by ``1 w^T``. Unlike torchvision, values are clamped once,
        after the composed map, not after each step.
        """
        b, dev = img.shape[0], img.device
        w = _GRAY.to(img.device, img.dtype)
        ones = torch.ones(3, device=dev, dtype=img.dtype)
        eye = torch.eye(3, device=dev, dtype=img.dtype).expand(b, 3, 3)
        on = (torch.rand(b, device=dev) < self.p_jitter).to(img.dtype)
        fb, fc, fs = (1 + (torch.rand(3, b, device=dev, dtype=img.dtype) * 2 - 1) * self.jitter * on)
        angle = (torch.rand(b, device=dev, dtype=img.dtype) * 2 - 1) * self.hue * 2 * math.pi * on
        sat = fs[:, None, None] * eye + (1 - fs)[:, None, None] * torch.outer(ones, w)
        m = _hue_rotation(angle) @ sat * (fc * fb)[:, None, None]
        g = torch.einsum("c,bchw->b", w, img) / img[0, 0].numel()  # mean luma per image
        t = ((1 - fc) * fb * g)[:, None] * ones
        gray = (torch.rand(b, device=dev) < self.p_gray)[:, None, None]
        m = torch.where(gray, torch.outer(ones, w) @ m, m)
        return m, t

    def blur(self, img: Tensor) -> Tensor:
        """Gaussian blur with a per-image sigma ~ U(sigma), kernel ~10% of the image side (odd)."""
        b, c, h, w = img.shape
        k = max(3, int(0.1 * self.image_size) // 2 * 2 + 1)
        sig = torch.empty(b, device=img.device).uniform_(*self.sigma)
        t = torch.arange(k, device=img.device, dtype=img.dtype) - k // 2
        kern = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
        x = F.pad(img.reshape(1, b * c, h, w), (k // 2,) * 4, mode="reflect")
        x = F.conv2d(x, kern[:, None, None, :], groups=b * c)
        x = F.conv2d(x, kern[:, None, :, None], groups=b * c)
        return x.reshape(b, c, h, w)

    def forward(self, images: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] -> normalised views ``(B, 3, S, S)``, in the images' dtype.

        Augmentation is data preparation, not model compute: it runs in full precision with autocast off
        (under bf16 autocast the blur's convolution would return bf16 into a float32 batch).
        """
        with torch.autocast(images.device.type, enabled=False):
            return self._augment(images)

    def _augment(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        s, dev = self.image_size, images.device
        boxes = self.crop_boxes(b, h, w, dev).to(images.dtype)  # roi_align wants boxes of the images dtype
        out = roi_align(images, boxes, (s, s), aligned=True)  # (B, 3, S, S)
        flip = torch.rand(b, device=dev) < 0.5
        out[flip] = out[flip].flip(-1)
        m, t = self.colour_maps(out)
        out = (torch.einsum("bij,bjhw->bihw", m, out) + t[:, :, None, None]).clamp_(0, 1)
        blur = torch.rand(b, device=dev) < self.p_blur
        if blur.any():
            out[blur] = self.blur(out[blur])
        return (out - self.mean) / self.std


def _hue_rotation(angle: Tensor) -> Tensor:
    """Matrices ``(B, 3, 3)`` that rotate the chroma of RGB colours by ``angle (B,)`` radians in YIQ space."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                          dtype=angle.dtype, device=angle.device)
    rot = angle.new_zeros(angle.shape[0], 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def simclr_transforms(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Compose:
    """The same augmentation as a per-image torchvision ``transforms.v2`` pipeline (for DataLoaders)."""
    k = max(3, int(0.1 * image_size) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, HUE)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
        v2.Normalize(mean, std),
    ])
