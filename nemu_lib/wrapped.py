"""Any CNN as an :class:`~nemu_lib.encoders.Encoder`: its vector and its maps from one pass, in one call.

A model that maps images ``(B, C, H, W)`` to a vector ``(B, D)`` (a torchvision classifier whose head is
replaced by ``nn.Identity()``, or any module) is traced with torch.fx, and torchvision's
``create_feature_extractor`` rewrites its graph to return the vector *and* chosen intermediate maps, the
taps, from the same pass; the result has the whole Encoder interface (strides, channels, ``min_size``,
normalisation), so RELAX, NEM-U and Network Dissection take it as they take the built-in backbones::

    model = torchvision.models.mobilenet_v3_small(); model.classifier = nn.Identity()
    encoder = Encoder.wrap(model)            # taps: the last node of each resolution
    z, maps = encoder.forward_features(x)    # z == model(x); maps fine to coarse

How taps are chosen. Tap names are node names of ``create_feature_extractor`` (``"layer1.1.relu_1"``, or a
module's name, ``"layer1"``, for its last node: :func:`node_shapes` lists them). Without ``taps``, one dry
run on a blank probe image (``probe_size``, eval mode, no gradients, on the model's device) records every
node's output shape, and for each resolution the *last* node computed at it becomes a tap, fine to coarse:
the output of each stage, just before the next one downsamples (ResNet: ``relu`` after the stem, then the
last ReLU of layer1..4; MobileNet and EfficientNet, whose blocks widen before they downsample: the widening
1 x 1 convolution of the block that downsamples next). Never chosen, as they are not maps of the image: the
input and what is computed from it without parameters (its normalisation); adaptive pooling and what follows
it at the pooled size (global pooling, squeeze-and-excitation, VGG's fixed 7 x 7 pool); maps of a single row
or column (a global mean with ``keepdim``: probe at a size where the coarsest map is at least 2 x 2, the
default 224 for ImageNet CNNs).

A map's stride is the probe's side over the map's side, rounded to the nearest power of two when within 15 %
of it (else to the nearest integer): nominal, exact at probe sides divisible by the largest stride (224 = 7 *
32). Images of any size at least ``min_size`` work, odd and non-square ones too: the maps are whatever the
model gives (for a ResNet, ``ceil(H / s) x ceil(W / s)``).

The encoder shares the model's modules (no copy): freezing it (:class:`nemu_lib.nem.NEMU` does) freezes the
model too.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, fx, nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from .checks import check_images
from .config import module_device
from .encoders import IMAGENET_MEAN, IMAGENET_STD, Encoder

_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ADAPTIVE_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch._C._nn.adaptive_avg_pool2d)


class WrappedEncoder(Encoder):
    """A traced model as an encoder: ``z`` is the model's output, the maps its tap nodes' outputs.

    Built by :func:`wrap` (or ``Encoder.wrap``), which infers the attributes below from a dry run.

    Attributes:
        body: the feature extractor, a ``torch.fx.GraphModule`` returning ``{"z", "map0", "map1", ...}``.
        feature_names: the tap names, fine to coarse (what :func:`nemu_lib.dissection.layer_names` lists).
        config: ``{"name": "wrapped", "model": class name, "taps": [...]}``, JSON-serialisable (it names the
            architecture; the weights are the model's).
    """

    def __init__(
        self,
        body: fx.GraphModule,
        taps: Sequence[str],
        feature_channels: Sequence[int],
        feature_strides: Sequence[int],
        embed_dim: int,
        min_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
        name: str = "model",
    ) -> None:
        super().__init__()
        self.body = body
        self.feature_names = tuple(taps)
        self.feature_channels = tuple(feature_channels)
        self.feature_strides = tuple(feature_strides)
        self.embed_dim, self.min_size, self.in_channels = embed_dim, min_size, in_channels
        self.mean, self.std = tuple(mean), tuple(std)
        self.config = {"name": "wrapped", "model": name, "taps": list(taps)}
        self.train(body.training)  # the model's mode

    def _forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.body.training != self.training:  # torchvision's DualGraphModule leaves copy.deepcopy in train mode
            self.body.train(self.training)
        out = self.body(x)  # one pass: {"z": (B, D), "map<i>": (B, C_i, ~H / s_i, ~W / s_i)}
        return out["z"], [out[f"map{i}"] for i in range(len(self.feature_names))]

    def extra_repr(self) -> str:
        return f"model={self.config['model']}, taps={list(self.feature_names)}, strides={list(self.feature_strides)}"


@dataclass
class _Node:
    """One node of the dry run: its output shape (``None``: not a tensor) and whether it can be a tap."""

    name: str
    shape: tuple[int, ...] | None
    learned: bool  # computed with at least one parameter (not the input or its normalisation)
    pooled: bool  # an adaptive pooling's output, or computed from one at its size


class _DryRun(fx.Interpreter):
    """Runs a traced graph node by node, recording each node's output shape and its two flags."""

    def __init__(self, module: fx.GraphModule, names: dict[fx.Node, str]) -> None:
        super().__init__(module)
        self.names = names
        self.nodes: dict[fx.Node, _Node] = {}

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        shape = tuple(out.shape) if isinstance(out, Tensor) else None
        inputs = [self.nodes[i] for i in n.all_input_nodes if i in self.nodes]
        if n.op == "call_module":
            module = self.module.get_submodule(n.target)
            own_weights = next(module.parameters(), None) is not None
            adaptive = isinstance(module, _ADAPTIVE_POOLS)
        else:
            own_weights = n.op == "get_attr" and isinstance(out, nn.Parameter)
            adaptive = n.op == "call_function" and n.target in _ADAPTIVE_POOL_FUNCTIONS
        is_map = shape is not None and len(shape) == 4
        pooled = adaptive or any(i.pooled and is_map and i.shape[-2:] == shape[-2:] for i in inputs)
        self.nodes[n] = _Node(self.names.get(n, n.name), shape, own_weights or any(i.learned for i in inputs), pooled)
        return out


def _tracer_kwargs(tracer_kwargs: dict | None) -> dict:
    """The caller's tracer settings, plus ``check_images`` kept as one call (nemu's encoders call it on input)."""
    kwargs = dict(tracer_kwargs or {})
    kwargs["autowrap_functions"] = (*kwargs.get("autowrap_functions", ()), check_images)
    return kwargs


def _node_path_tracer(tracer_kwargs: dict | None) -> NodePathTracer:
    """The tracer ``create_feature_extractor`` uses, with its defaults (torchvision.ops wrapped and kept whole)."""
    kwargs = _tracer_kwargs(tracer_kwargs)
    ops = [obj for _, obj in inspect.getmembers(torchvision.ops) if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    kwargs["autowrap_modules"] = (*kwargs.get("autowrap_modules", ()), math, torchvision.ops)
    kwargs["leaf_modules"] = [*kwargs.get("leaf_modules", ()), *ops]
    return NodePathTracer(**kwargs)


def _probe_shape(probe_size: int | tuple[int, int]) -> tuple[int, int]:
    size = (probe_size, probe_size) if isinstance(probe_size, int) else tuple(probe_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"probe_size must be a side or (height, width) of positive ints, got {probe_size!r}")
    return size


def _dry_run(
    model: nn.Module, size: tuple[int, int], in_channels: int, tracer_kwargs: dict | None, name: str
) -> tuple[list[_Node], str | None]:
    """Every node of ``model``'s eval-mode graph on a blank ``(1, in_channels, *size)`` image, in execution
    order, and the name of the node the model returns (``None`` when it returns no single node)."""
    was_training = model.training
    model.eval()
    try:
        tracer = _node_path_tracer(tracer_kwargs)
        try:
            graph = tracer.trace(model)
        except Exception as err:  # noqa: BLE001 (fx raises many kinds: report any with the fix)
            raise ValueError(f"torch.fx cannot trace {name} ({type(err).__name__}: {err}): pass tracer_kwargs="
                             "{'leaf_modules': [...], 'autowrap_functions': [...]} for the parts it cannot trace "
                             "(see torchvision's create_feature_extractor)") from err
        run = _DryRun(fx.GraphModule(tracer.root, graph), tracer.node_to_qualname)
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        probe = torch.zeros(1, in_channels, *size, device=module_device(model), dtype=dtype)
        with torch.no_grad():
            try:
                run.run(probe)
            except RuntimeError as err:
                raise ValueError(f"{name} fails on a {size[0]}x{size[1]} probe with {in_channels} channels ({err}): "
                                 "pass the probe_size and in_channels it takes") from err
    finally:
        model.train(was_training)
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    z = tracer.node_to_qualname.get(output) if isinstance(output, fx.Node) else None
    return [run.nodes[n] for n in graph.nodes if n in tracer.node_to_qualname], z


def _stride(probe_side: int, map_side: int) -> int:
    """probe side / map side: the nearest power of two when within 15 % of it, else the nearest integer."""
    ratio = probe_side / map_side
    power = 2 ** round(math.log2(ratio)) if ratio >= 1 else 1
    return power if abs(ratio / power - 1) <= 0.15 else max(round(ratio), 1)


def _is_map(node: _Node, size: tuple[int, int]) -> bool:
    """Whether ``node`` can be an automatic tap (see the module docstring)."""
    s = node.shape
    if s is None or len(s) != 4 or min(s[-2:]) < 2 or not node.learned or node.pooled:
        return False
    return _stride(size[0], s[-2]) == _stride(size[1], s[-1])  # a map of the image scales along both axes


def _resolve(query: str, nodes: list[_Node]) -> _Node | None:
    """The node ``create_feature_extractor`` returns for ``query``: that node, or a module's last node."""
    return next((n for n in reversed(nodes) if n.name == query or n.name.startswith(query + ".")), None)


def node_shapes(
    model: nn.Module, probe_size: int | tuple[int, int] = 224, in_channels: int = 3, tracer_kwargs: dict | None = None
) -> dict[str, tuple[int, ...]]:
    """Every traced node's output shape on a ``probe_size`` image, in execution order: the names :func:`wrap`
    takes as taps (a module's name also works: its last node).

    >>> shapes = node_shapes(torchvision.models.resnet18())
    >>> shapes["conv1"], shapes["layer1.1.relu_1"], shapes["avgpool"], shapes["fc"]
    ((1, 64, 112, 112), (1, 64, 56, 56), (1, 512, 1, 1), (1, 1000))
    """
    nodes, _ = _dry_run(model, _probe_shape(probe_size), in_channels, tracer_kwargs, type(model).__name__)
    return {n.name: n.shape for n in nodes if n.shape is not None}


def wrap(
    model: nn.Module,
    taps: Sequence[str] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    min_size: int | None = None,
    probe_size: int | tuple[int, int] = 224,
    in_channels: int = 3,
    name: str | None = None,
    weights: torchvision.models.WeightsEnum | None = None,
    tracer_kwargs: dict | None = None,
) -> WrappedEncoder:
    """``model`` (images ``(B, C, H, W)`` → vectors ``(B, D)``) as an :class:`~nemu_lib.encoders.Encoder`.

    Args:
        model: e.g. a torchvision classifier with ``classifier`` / ``fc`` / ``head`` replaced by ``nn.Identity()``
            (ConvNeXt: ``model.classifier[2]``, keeping its norm and flatten). Its modules are shared, not copied.
        taps: ``create_feature_extractor`` node or module names, fine to coarse (:func:`node_shapes` lists them);
            default: the last node of each resolution of a dry run (see the module docstring).
        mean, std: the normalisation the model expects; default ``weights``'s, else ImageNet's
            (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225).
        min_size: the smallest input side; default the largest stride of the model's maps (the coarsest has
            at least one unit). Smaller images raise :func:`~nemu_lib.checks.check_images`'s error.
        probe_size: side, or (height, width), of the dry run's blank image; strides are exact where it is
            divisible by the largest stride.
        in_channels: the channels the model takes.
        name: the model's name in ``config`` and messages (default: its class name).
        weights: torchvision weights (``WeightsEnum``) to read ``mean`` and ``std`` from (their
            ``transforms()``); the model's weights are not loaded.
        tracer_kwargs: for the fx tracer, as ``create_feature_extractor`` takes them (``leaf_modules``,
            ``autowrap_functions``): parts of a model torch.fx cannot trace.

    Returns:
        A :class:`WrappedEncoder` in the model's training mode, on its device.

    Raises:
        ValueError: the model does not return ``(B, D)``, a tap is unknown or not a map ``(B, C, h, w)``, taps
            repeat or go coarse to fine, or the model cannot be traced or run on the probe.

    >>> model = torchvision.models.resnet18(); model.fc = nn.Identity()
    >>> enc = wrap(model)
    >>> enc.feature_names, enc.feature_strides
    (('relu', 'layer1.1.relu_1', 'layer2.1.relu_1', 'layer3.1.relu_1', 'layer4.1.relu_1'), (2, 4, 8, 16, 32))
    """
    name = name or type(model).__name__
    size = _probe_shape(probe_size)
    nodes, z_name = _dry_run(model, size, in_channels, tracer_kwargs, name)
    z_node = next((n for n in nodes if n.name == z_name), None)
    if z_node is None or z_node.shape is None or len(z_node.shape) != 2:
        got = "no single tensor" if z_node is None or z_node.shape is None else f"shape {z_node.shape}"
        raise ValueError(f"{name} returns {got} on a {size[0]}x{size[1]} probe, but wrap needs (B, D): replace its "
                         "classifier by nn.Identity() (ConvNeXt: model.classifier[2]) or pool, e.g. "
                         "nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten())")
    stride = {n.name: max(_stride(size[0], n.shape[-2]), _stride(size[1], n.shape[-1]))
              for n in nodes if n.shape is not None and len(n.shape) == 4}
    last_at: dict[int, str] = {}  # stride -> the last map computed at it
    for n in nodes:
        if _is_map(n, size):
            last_at[stride[n.name]] = n.name
    if taps is None:
        if not last_at:
            raise ValueError(f"{name} computes no map (B, C, h, w) of at least 2x2 on a {size[0]}x{size[1]} probe: "
                             "pass a larger probe_size, or taps=[...] (see nemu_lib.wrapped.node_shapes)")
        taps = [last_at[s] for s in sorted(last_at)]
    taps = [taps] if isinstance(taps, str) else list(taps)
    if not taps or len(set(taps)) != len(taps):
        raise ValueError(f"taps must be distinct node names, fine to coarse, got {taps}")
    resolved = []
    for tap in taps:
        node = _resolve(tap, nodes)
        if node is None:
            sample = [n.name for n in nodes if n.name in stride]
            raise ValueError(f"unknown tap {tap!r} of {name}: choose a node or module name such as "
                             f"{sample[1:8] + sample[-3:]} (all of them: nemu_lib.wrapped.node_shapes(model))")
        if node.name not in stride:
            raise ValueError(f"tap {tap!r} of {name} gives {node.shape}, not a map (B, C, h, w): choose a node "
                             "before the pooling (nemu_lib.wrapped.node_shapes(model) lists the shapes)")
        if node in resolved:
            raise ValueError(f"taps {taps} name the node {node.name!r} twice: keep one of them")
        resolved.append(node)
    strides = [stride[n.name] for n in resolved]
    if strides != sorted(strides):
        raise ValueError(f"taps {taps} have strides {strides}: order them fine to coarse (smallest stride first)")

    if weights is not None:
        preset = weights.transforms()
        mean, std = preset.mean if mean is None else mean, preset.std if std is None else std
    mean = tuple(float(v) for v in (IMAGENET_MEAN if mean is None else mean))
    std = tuple(float(v) for v in (IMAGENET_STD if std is None else std))
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values (one per input channel), got {mean} and {std}")
    if min_size is None:
        min_size = max([*last_at, *strides])  # the coarsest map of the whole model, not just of the taps
    if min_size < 1:
        raise ValueError(f"min_size must be a positive number of pixels, got {min_size}")
    return_nodes = {z_name: "z", **{tap: f"map{i}" for i, tap in enumerate(taps)}}
    body = create_feature_extractor(model, return_nodes=return_nodes, tracer_kwargs=_tracer_kwargs(tracer_kwargs),
                                    suppress_diff_warning=True)
    return WrappedEncoder(body, taps, [n.shape[1] for n in resolved], strides, z_node.shape[1], min_size,
                          mean, std, in_channels, name)
