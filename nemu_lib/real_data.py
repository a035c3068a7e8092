"""Real data sets through torchvision (STL10, Imagenette, VOC 2012), with a clear error offline.

They need internet once (or files placed by hand in ``data/``, see data/README.md); the embedded Shapes
scenes (:mod:`nemu_lib.data`) need neither. Offline, :func:`load_real_dataset` raises
:class:`DatasetUnavailableError`, whose message says where to put the files, and never hangs on a download.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from .config import data_dir


class DatasetUnavailableError(RuntimeError):
    """A real data set is neither on disk nor downloadable (offline)."""


_REAL = {  # name: (download host, approximate size, what to place by hand)
    "stl10": ("ai.stanford.edu", "2.6 GB", "stl10_binary/ (from stl10_binary.tar.gz)"),
    "imagenette": ("s3.amazonaws.com", "99 MB", "imagenette2-160/ (from imagenette2-160.tgz)"),
    "voc": ("host.robots.ox.ac.uk", "2 GB", "VOCdevkit/VOC2012/ (from VOCtrainval_11-May-2012.tar)"),
}


def _online(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_real_dataset(
    name: str,
    split: str = "train",
    image_size: int = 96,
    root: str | Path | None = None,
    download: bool = True,
) -> torch.utils.data.Dataset:
    """STL10, Imagenette or VOC 2012 (segmentation) through torchvision, resized to ``image_size``.

    Items are ``(image (3, S, S) in [0, 1], target)``: the class index (STL10, Imagenette; -1 for STL10's
    unlabelled split) or the segmentation mask ``(S, S)`` (VOC). Files land in ``root`` (default
    ``data_dir() / name``). Offline, with the files absent, raises :class:`DatasetUnavailableError` that
    says where to put them; the embedded :class:`ShapesScenes` need no files.

    Splits: stl10 ``unlabeled`` / ``train`` / ``test`` / ``train+unlabeled``; imagenette ``train`` /
    ``val``; voc ``train`` / ``val``.
    """
    import torchvision
    from torchvision.transforms import v2

    if name not in _REAL:
        raise ValueError(f"unknown data set {name!r}: choose one of {list(_REAL)} (or use ShapesScenes offline)")
    root = Path(root) if root is not None else data_dir() / name
    image_tf = v2.Compose([v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                           v2.ToDtype(torch.float32, scale=True)])
    mask_tf = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, interpolation=v2.InterpolationMode.NEAREST),
                          v2.CenterCrop(image_size), v2.Lambda(lambda m: m[0].long())])

    def build(dl: bool) -> torch.utils.data.Dataset:
        if name == "stl10":
            return torchvision.datasets.STL10(root, split=split, transform=image_tf, download=dl)
        if name == "imagenette":
            return torchvision.datasets.Imagenette(root, split=split, size="160px", transform=image_tf, download=dl)
        return torchvision.datasets.VOCSegmentation(root, year="2012", image_set=split, transform=image_tf,
                                                    target_transform=mask_tf, download=dl)

    try:
        return build(False)
    except (RuntimeError, FileNotFoundError, OSError):
        pass  # not on disk (torchvision raises one of these), try downloading
    host, size, layout = _REAL[name]
    if download and _online(host):
        try:
            return build(True)
        except OSError as err:  # URLError is an OSError
            reason = f"the download failed ({err})"
    else:
        reason = "this machine is offline" if download else "download=False"
    raise DatasetUnavailableError(
        f"{name} ({split}) is not in {root} and {reason}. It needs internet once to download (~{size}); "
        f"or place {layout} in {root} by hand. The embedded Shapes scenes work offline: "
        "nemu_lib.data.ShapesScenes(...)"
    )
