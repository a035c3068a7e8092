"""Self-supervised encoders: SimCLR, a supervised baseline, a random control, and probes.

SimCLR (Chen et al., ICML 2020, arXiv 2002.05709) pulls two augmented views of an image together in
representation space and pushes the other 2N - 2 views of the batch away. With projections
``p = g(f(x))`` normalised to the unit sphere and ``sim(a, b) = a.b / (|a||b|)``, the NT-Xent loss of the
positive pair (i, j) is (eq. 1 of the paper)::

    l(i, j) = -log exp(sim(p_i, p_j) / tau) / sum_{k != i} exp(sim(p_i, p_k) / tau)

averaged over all 2N ordered positive pairs. The encoder ``f`` is what we keep and explain; the
projection head ``g`` is thrown away after training.

``pretrained_encoder(kind, profile)`` loads ``outputs/encoders/<kind>-<profile>-seed<seed>.pt`` or trains
it, so every notebook can run alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align
from torchvision.transforms import v2
from tqdm.auto import tqdm

from .budget import announce, forward_gflops
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Profile, autocast, get_profile, grad_scaler, outputs_dir, seed_everything
from .config import device as default_device
from .data import SHAPES, load_split
from .encoders import Encoder, build_encoder

# ----------------------------------------------------------------------------------- augmentations

_GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma; torchvision uses 0.2989 for red (<= 1e-4 apart)


# Hue jitter of SimCLR's views, a share of a turn (0.5: any hue). Chen et al. (ICML 2020, Sec. 3) found colour
# distortion essential because colour histograms alone tell ImageNet images apart; Shapes scenes are more so.
# cpu profile, batch 64, shape probe (random encoder 0.23): 0.29 with hue 0.1, 0.31 with 0.5.
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


# ------------------------------------------------------------------------------------------ losses

def nt_xent(p1: Tensor, p2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (SimCLR eq. 1) of two batches of projections ``(N, d)``, the views of the same N images.

    >>> p = torch.randn(4, 8)
    >>> bool(nt_xent(p, p, 0.5) < nt_xent(p, torch.randn(4, 8), 0.5))
    True
    """
    if p1.shape != p2.shape or p1.ndim != 2:
        raise ValueError(f"p1 and p2 must both have shape (N, d), got {tuple(p1.shape)} and {tuple(p2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    n = p1.shape[0]
    p = F.normalize(torch.cat([p1, p2]), dim=1)  # (2N, d) on the unit sphere
    logits = p @ p.T / temperature  # (2N, 2N) sim(p_i, p_k) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=p.device), float("-inf"))  # k != i
    positives = torch.cat([torch.arange(n, 2 * n, device=p.device), torch.arange(n, device=p.device)])  # j(i)
    return F.cross_entropy(logits, positives)


class ProjectionHead(nn.Module):
    """g: Linear - BatchNorm - ReLU - Linear (SimCLR's MLP head)."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, out_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


# ---------------------------------------------------------------------------------------- training

def fit(
    model: nn.Module,
    loss_fn: Callable[[Tensor], Tensor],
    n: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
    amp: bool = True,
) -> list[float]:
    """Train ``model``'s parameters with AdamW and a cosine schedule (5 % linear warm-up).

    ``loss_fn(idx)`` computes the loss of the batch of sample indices ``idx``; batches are reshuffled
    every epoch with a generator seeded by ``seed`` and the last incomplete batch is dropped (BatchNorm
    and NT-Xent want full batches). With ``amp``, on CUDA the forward runs under autocast (bf16, or fp16 with
    loss scaling on GPUs older than Ampere: :func:`nemu_lib.config.autocast`); on other devices an outer
    ``torch.autocast`` is left in force. Returns the loss of
    every step; ``callback(step, loss)`` sees them live.
    """
    if n < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"nothing to train: {n} samples, batch size {batch_size}, {epochs} epochs")
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    if total < 1:
        raise ValueError(f"nothing to train: {n} samples, batch size {batch_size}, {epochs} epochs")
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = grad_scaler(dev, amp)
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    model.train()
    with tqdm(total=total, desc=desc, disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen, device="cpu")
            for b in range(steps_per_epoch):
                idx = order[b * batch_size:(b + 1) * batch_size]
                with autocast(dev, amp):
                    loss = loss_fn(idx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{desc}: non-finite loss at step {len(history)}; lower the lr")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                history.append(loss.item())
                bar.set_postfix(loss=f"{history[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
                bar.update()
                if callback is not None:
                    callback(len(history), history[-1])
    model.eval()
    return history


def train_simclr(
    encoder: Encoder,
    images: Tensor,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    temperature: float = 0.2,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """SimCLR-pretrain ``encoder`` in place on ``images (N, 3, H, W)`` in [0, 1]; return the loss per step."""
    dev = next(encoder.parameters()).device
    seed_everything(seed)
    augment = SimCLRAugment(images.shape[-1], encoder.mean, encoder.std).to(dev)
    model = nn.ModuleDict({"f": encoder, "g": ProjectionHead(encoder.embed_dim)}).to(dev)

    def loss_fn(idx: Tensor) -> Tensor:
        batch = images[idx].to(dev, non_blocking=True)
        views = torch.cat([augment(batch), augment(batch)])  # (2N, 3, S, S): one pass for both views
        p1, p2 = model["g"](model["f"](views)).float().chunk(2)
        return nt_xent(p1, p2, temperature)

    steps = epochs * (len(images) // min(batch_size, len(images)))
    announce(f"SimCLR, {steps} steps of {2 * batch_size} views", forward_gflops(encoder, images[:1].to(dev)),
             train_images=steps * 2 * batch_size, calls=steps, device=dev)
    return fit(model, loss_fn, len(images), epochs, batch_size, lr, seed=seed, desc="SimCLR",
               progress=progress, callback=callback)


def train_supervised(
    encoder: Encoder,
    images: Tensor,
    labels: Tensor,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``encoder`` in place with a linear classifier and cross-entropy (light crop/flip augmentation)."""
    dev = next(encoder.parameters()).device
    seed_everything(seed)
    augment = SimCLRAugment(images.shape[-1], encoder.mean, encoder.std, scale=(0.6, 1.0),
                            p_jitter=0.0, p_gray=0.0, p_blur=0.0).to(dev)
    n_classes = int(labels.max()) + 1
    model = nn.ModuleDict({"f": encoder, "head": nn.Linear(encoder.embed_dim, n_classes)}).to(dev)

    def loss_fn(idx: Tensor) -> Tensor:
        logits = model["head"](model["f"](augment(images[idx].to(dev))))
        return F.cross_entropy(logits.float(), labels[idx].to(dev))

    steps = epochs * (len(images) // min(batch_size, len(images)))
    announce(f"supervised training, {steps} steps of {batch_size} images", forward_gflops(encoder, images[:1].to(dev)),
             train_images=steps * batch_size, calls=steps, device=dev)
    return fit(model, loss_fn, len(images), epochs, batch_size, lr, seed=seed, desc="supervised",
               progress=progress, callback=callback)


# ------------------------------------------------------------------------------------------- probes

@torch.inference_mode()
def embed(encoder: Encoder, x: Tensor, batch_size: int = 256, progress: bool = False) -> Tensor:
    """Representations ``z (N, D)`` on the CPU of normalised images ``x (N, C, H, W)``, in eval mode."""
    was_training = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    chunks = range(0, len(x), batch_size)
    z = torch.cat([encoder(x[i:i + batch_size].to(dev)).float().cpu()
                   for i in tqdm(chunks, desc="embed", disable=not progress)])
    encoder.train(was_training)
    return z


def linear_probe(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, seed: int = 0) -> float:
    """Accuracy of a logistic regression on standardised frozen features (scikit-learn, L-BFGS)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    with threadpool_limits(1, user_api="blas"):  # BLAS threads fighting torch's made it 40x slower
        clf.fit(z_train.cpu().numpy(), y_train.cpu().numpy())  # scikit-learn fits on the CPU
        return float(clf.score(z_test.cpu().numpy(), y_test.cpu().numpy()))


def knn_accuracy(
    z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, k: int = 20, temperature: float = 0.07
) -> float:
    """Weighted k-NN accuracy on cosine similarity (Wu et al., CVPR 2018): votes ``exp(sim / temperature)``."""
    sim = F.normalize(z_test, dim=1) @ F.normalize(z_train, dim=1).T  # (N_test, N_train)
    top, idx = sim.topk(min(k, len(z_train)), dim=1)
    votes = torch.zeros(len(z_test), int(y_train.max()) + 1, device=z_test.device, dtype=top.dtype)
    votes.scatter_add_(1, y_train[idx], (top / temperature).exp())  # (N_test, classes)
    return float((votes.argmax(1) == y_test).float().mean())


# ---------------------------------------------------------------------------------- trained encoders

ENCODER_KINDS = ("simclr", "supervised", "random")
TRAINING_VERSION = 3  # bump when the training recipe changes, so saved encoders are retrained


def encoder_path(kind: str, profile: Profile, seed: int = 0) -> Path:
    return outputs_dir() / "encoders" / f"{kind}-{profile.name}-seed{seed}.pt"


def load_encoder(
    path: str | Path,
    image_size: int | None = None,
    encoder_config: dict | None = None,
    training: dict | None = None,
) -> Encoder:
    """Rebuild an encoder from a checkpoint of :func:`pretrained_encoder`, checking what it was built for.

    Any of ``image_size``, ``encoder_config`` (architecture) and ``training`` (the settings it was trained
    with) that is given must match the checkpoint, else ``ValueError`` names the differences.
    """
    expect = {"image_size": image_size, "encoder": encoder_config, "training": training}
    ckpt = load_checkpoint(path, expect={k: v for k, v in expect.items() if v is not None})
    encoder = build_encoder(**ckpt["config"]["encoder"])
    encoder.load_state_dict(ckpt["state_dict"])
    encoder.history = ckpt.get("history", [])
    return encoder.eval()


def pretrained_encoder(
    kind: str,
    profile: str | Profile | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    retrain: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> Encoder:
    """The small-ResNet encoder of ``kind`` for ``profile``: loaded from ``outputs/encoders`` or trained.

    Kinds: ``simclr`` (self-supervised), ``supervised`` (main-object shape classification) and ``random``
    (initialisation only: the control). Training uses the profile's Shapes training split; the result is
    saved atomically with its config and loss history (``encoder.history``). Returns it in eval mode on
    ``device``.
    """
    if kind not in ENCODER_KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}: choose one of {ENCODER_KINDS}")
    p = get_profile(profile)
    dev = default_device(device)
    path = encoder_path(kind, p, seed)
    seed_everything(seed)
    encoder = build_encoder("small_resnet", widths=p.encoder_widths)
    epochs = {"simclr": p.ssl_epochs, "supervised": p.supervised_epochs, "random": 0}[kind]
    training = {"n_train": p.n_train, "epochs": epochs, "batch_size": p.batch_size, "lr": p.lr,
                "temperature": p.temperature if kind == "simclr" else None, "mean": list(encoder.mean),
                "std": list(encoder.std), "version": TRAINING_VERSION}
    config = {"kind": kind, "profile": p.name, "image_size": p.image_size, "seed": seed,
              "encoder": encoder.config, "training": training}
    if path.exists() and not retrain:
        try:
            return load_encoder(path, image_size=p.image_size, encoder_config=encoder.config,
                                training=training).to(dev)
        except ValueError as err:  # trained with other settings: say so, then retrain
            print(f"retraining {kind}: {err}")
    encoder = encoder.to(dev)
    history: list[float] = []
    if kind != "random":
        data = load_split("train", p)  # the fixed data stream; ``seed`` varies initialisation and order
        common = dict(epochs=epochs, batch_size=p.batch_size, lr=p.lr, seed=seed, progress=progress,
                      callback=callback)
        if kind == "simclr":
            history = train_simclr(encoder, data["image"], temperature=p.temperature, **common)
        else:
            history = train_supervised(encoder, data["image"], data["label"], **common)
    save_checkpoint({"config": config, "state_dict": encoder.state_dict(), "history": history,
                     "classes": list(SHAPES)}, path)
    encoder.history = history
    return encoder.eval()
