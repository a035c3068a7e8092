"""Evaluate explanations of a representation: every method on the same scenes, every metric, one table.

The claim under test is NEM-U's (Møller et al., ICML 2024): explanations far faster than RELAX, with lower
complexity, at high locality. Notebook 04, ``bench/quality.py`` and ``make run``'s ``outputs/results.md``
all build their table here::

    maps, seconds = explain_all(encoder, decoders, x, n_masks=3000)
    scores = score_maps(encoder, x, object_masks, maps, reference=maps["RELAX"])
    table = summarize(scores, seconds)

Methods: NEM-U (``nem``), NEM-U contrastive, amortised RELAX (the ``relax`` decoders of
:mod:`nemu_lib.runs`), RELAX and U-RELAX (Wickstrøm et al., IJCV 2023), label-free gradient and integrated
gradients (Crabbé & van der Schaar, ICML 2022) and a random map. Metrics (:mod:`nemu_lib.metrics`):
Relevance Mass and Rank Accuracy and the Pointing Game against the main object's mask, complexity
(entropy), sparseness (Gini), deletion and insertion AUC in representation space, and fidelity (Pearson and
Spearman) to RELAX with N = 3,000. Maps are min-max normalised per image before mass accuracy, complexity
and sparseness: RELAX's importance sits on the level of the similarities (~0.9, varying by ~1e-2), and that
constant would otherwise decide all three; the other metrics do not change under it.

RELAX's own Monte-Carlo noise sets the ceiling of every fidelity figure: :func:`relax_convergence` runs an
independent RELAX in growing chunks and gives its fidelity to the reference at each N, which also says how
many masks NEM-U is worth (:func:`worth_n_masks`, on :func:`mean_fidelity`; in words: :func:`describe_worth`).

To read the table: :func:`object_share` is the locality metrics' chance level, :func:`where_the_maximum_is` says
where a map's top pixels lie (what the Pointing Game reads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import metrics
from .baselines import label_free_gradient, label_free_integrated_gradients, random_map
from .nem import NEMU
from .progress import tqdm
from .relax import RelaxResult, relax

METHODS = ("NEM-U", "NEM-U contrastive", "amortised RELAX", "RELAX", "U-RELAX", "label-free gradient",
           "label-free IG", "random")
DECODER_METHODS = {"NEM-U": "nem", "NEM-U contrastive": "nem-contrastive", "amortised RELAX": "relax"}
# not explanations to score, but what explain_all also returns when asked: RELAX's uncertainty (Eq. 4) and the
# amortised-RELAX decoder's prediction of it
RELAX_UNCERTAINTY, AMORTISED_UNCERTAINTY = "RELAX uncertainty", "amortised RELAX uncertainty"
CONVERGENCE_NS = (25, 50, 100, 200, 400, 800, 1600)  # RELAX's N for the convergence curve, below the full N
# metric: (label, higher is better?)
METRICS = {
    "relevance_mass": ("Relevance Mass Acc.", True),
    "relevance_rank": ("Relevance Rank Acc.", True),
    "pointing_game": ("Pointing Game", True),
    "complexity": ("complexity (entropy)", False),
    "sparseness": ("sparseness (Gini)", True),
    "deletion_auc": ("deletion AUC", False),
    "insertion_auc": ("insertion AUC", True),
    "fidelity_pearson": ("fidelity to RELAX (Pearson)", True),
    "fidelity_spearman": ("fidelity to RELAX (Spearman)", True),
}


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[i:i + batch_size]).float().cpu() for i in range(0, len(x), batch_size)])


def _timed(fn: Callable[[], Tensor], n: int) -> tuple[Tensor, float]:
    """``(fn(), seconds per image)``, synchronising CUDA around the call."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / n


def explain_all(
    encoder: nn.Module,
    decoders: dict[str, NEMU],
    x: Tensor,
    n_masks: int = 3000,
    ig_steps: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    progress: bool = True,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Explain ``x (N, C, H, W)`` with every method: ``({method: maps (N, H, W)}, {method: seconds per image})``.

    ``decoders`` maps objectives (``nem``, ``nem-contrastive``, ``relax``) to trained NEM-U models on
    ``encoder``; decoder methods whose objective is missing are skipped. Each method is warmed up on one
    image, then timed over all N (wall clock; U-RELAX comes from RELAX's run and shares its time).
    ``methods`` may also name :data:`RELAX_UNCERTAINTY` (from RELAX's run) and :data:`AMORTISED_UNCERTAINTY`
    (from the ``relax`` decoder's pass).
    """
    maps: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    gen = torch.Generator(x.device).manual_seed(seed)
    runners: dict[str, Callable[[Tensor], Tensor]] = {
        "label-free gradient": lambda xb: label_free_gradient(encoder, xb),
        "label-free IG": lambda xb: label_free_integrated_gradients(encoder, xb, steps=ig_steps),
        "random": lambda xb: random_map(xb, generator=gen),
    }
    for name, objective in DECODER_METHODS.items():
        if objective in decoders:
            model = decoders[objective].eval()
            runners[name] = (lambda m: lambda xb: m.explain(xb)[1][:, 0])(model)
    if "relax" in decoders:
        runners[AMORTISED_UNCERTAINTY] = lambda xb: decoders["relax"].eval().explain(xb)[2][:, 0]
    todo = [m for m in methods if m in runners or m in ("RELAX", "U-RELAX", RELAX_UNCERTAINTY)]
    for name in tqdm(todo, desc="methods", disable=not progress):
        if name in ("U-RELAX", RELAX_UNCERTAINTY):
            continue  # from RELAX's run
        if name == "RELAX":
            relax(encoder, x[:1], n_masks=100, seed=seed)  # warm-up
            result, sec = _timed(lambda: relax(encoder, x, n_masks=n_masks, seed=seed, progress=progress), len(x))
            maps["RELAX"] = result.importance.float().cpu()
            seconds["RELAX"] = sec
            if "U-RELAX" in methods:
                maps["U-RELAX"] = (result.importance * result.u_relax_mask).float().cpu()
                seconds["U-RELAX"] = sec
            if RELAX_UNCERTAINTY in methods:
                maps[RELAX_UNCERTAINTY], seconds[RELAX_UNCERTAINTY] = result.uncertainty.float().cpu(), sec
            continue
        with torch.inference_mode(name not in ("label-free gradient", "label-free IG")):
            runners[name](x[:1])  # warm-up
            run = runners[name]
            maps[name], seconds[name] = _timed(lambda: _batched(run, x, batch_size), len(x))  # noqa: B023 (called now)
    return {m: maps[m] for m in methods if m in maps}, {m: seconds[m] for m in methods if m in seconds}


def _minmax(a: Tensor) -> Tensor:
    """Per-image min-max normalisation to [0, 1] ``(B, H, W)``; a constant map becomes all zeros."""
    flat = a.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(a)


# the metrics that need no object masks (photos, data sets without them): what score_maps gives with gt=None
MASK_FREE_METRICS = ("complexity", "sparseness", "deletion_auc", "insertion_auc", "fidelity_pearson",
                     "fidelity_spearman")


def score_maps(
    encoder: nn.Module,
    x: Tensor,
    gt: Tensor | None,
    maps: dict[str, Tensor],
    reference: Tensor | None = None,
    steps: int = 16,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, dict[str, Tensor]]:
    """Every metric of every method, per image: ``{method: {metric: (N,) float64}}``.

    Args:
        encoder: the encoder the maps explain (for the deletion and insertion curves).
        x: the images ``(N, C, H, W)``; gt: the main object's masks ``(N, H, W)``, or ``None`` for images
            without them (photos: ``nemu evaluate --encoder SPEC IMAGES``), which leaves out the locality
            metrics (:data:`MASK_FREE_METRICS` remain).
        maps: ``{method: (N, H, W)}``.
        reference: RELAX's importance ``(N, H, W)`` for the fidelity metrics (skipped when ``None``).
        steps: points of the deletion and insertion curves (besides 0).
    """
    dev = x.device
    scores: dict[str, dict[str, Tensor]] = {}
    for name, a in tqdm(maps.items(), desc="scoring", disable=not progress):
        a = a.to(dev)
        norm = _minmax(a)
        curves = metrics.deletion_insertion(encoder, x, a, steps=steps, batch_size=batch_size)
        s = {}
        if gt is not None:
            s.update(relevance_mass=metrics.relevance_mass_accuracy(norm, gt),
                     relevance_rank=metrics.relevance_rank_accuracy(a, gt), pointing_game=metrics.pointing_game(a, gt))
        s.update(complexity=metrics.complexity(norm), sparseness=metrics.sparseness(norm),
                 deletion_auc=curves.deletion_auc, insertion_auc=curves.insertion_auc)
        if reference is not None:
            ref = reference.to(dev)
            s["fidelity_pearson"] = metrics.pearson(a, ref)
            s["fidelity_spearman"] = metrics.spearman(a, ref)
        scores[name] = {k: v.double().cpu() for k, v in s.items()}
    return scores


def object_share(objects: Tensor) -> Tensor:
    """K / n per image: the share of the pixels that the main object covers, ``(N, H, W)`` -> ``(N,)`` float64.

    It is the chance level of the locality metrics: a map unrelated to the object puts about this share of its
    mass, of its top-K pixels and of its maxima on the object.

    >>> object_share(torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 0]]]))
    tensor([0.2500, 0.7500], dtype=torch.float64)
    """
    return objects.flatten(1).double().mean(1)


def where_the_maximum_is(maps: Tensor, objects: Tensor, plateau: float = 0.01, top: float = 0.01) -> dict[str, float]:
    """Where the top of each map lies, to read the Pointing Game: maps ``(N, H, W)``, objects ``(N, H, W)`` bool.

    Returns the means over the N maps of

    - ``"argmax on border"``: whether the maximum lies on the image's outermost ring of pixels *only*: when
      several pixels share the maximum, one of them off the ring counts as off the border. A mask upsampled
      bilinearly (``align_corners=False``) from coarser logits repeats its edge values on the outer rows and
      columns (NEM-U's x4: the two outermost), and the first index of such a tie, what ``argmax`` returns,
      lies on the ring at the top and left edges but not at the bottom and right: counting it would make the
      share change when the maps are flipped;
    - ``"max within 2 px of the edge"``: the same for the two outermost rows and columns (where such a tie
      lies whole);
    - ``"plateau pixels (median)"``: the median over maps of the plateau's size, the pixels within ``plateau``
      of the map's range from its maximum, a >= max a - plateau (max a - min a);
    - ``"plateau share on object"``: the share of the plateau's pixels on the object;
    - ``"top 1 % share on object"``: the share of the map's top ``top`` pixels (at least one) on the object.

    >>> a = torch.zeros(1, 4, 4); a[0, 1, 1] = 1.0; g = torch.zeros(1, 4, 4, dtype=torch.bool); g[0, 1, 1] = True
    >>> where_the_maximum_is(a, g)["argmax on border"], where_the_maximum_is(a, g)["plateau share on object"]
    (0.0, 1.0)
    """
    a = maps.flatten(1).double()  # (N, n)
    h, w = maps.shape[-2:]
    row, col = torch.arange(h, device=a.device)[:, None], torch.arange(w, device=a.device)[None, :]
    edge = torch.minimum(torch.minimum(row, h - 1 - row), torch.minimum(col, w - 1 - col)).flatten()  # (n,) to the edge
    lo, hi = a.min(1, keepdim=True).values, a.max(1, keepdim=True).values
    at_max = a == hi  # (N, n) every pixel that reaches the maximum
    border, near_edge = (~(at_max & (edge >= k)).any(1) for k in (1, 2))  # the maximum only on the outer k px
    flat = a >= hi - plateau * (hi - lo)  # (N, n) the plateau
    g = objects.flatten(1).bool().to(a.device)
    top_k = a.topk(max(1, int(a.shape[1] * top + 1e-9)), dim=1).indices  # (N, k) the top pixels
    return {"argmax on border": border.double().mean().item(),
            "max within 2 px of the edge": near_edge.double().mean().item(),
            "plateau pixels (median)": flat.sum(1).double().median().item(),
            "plateau share on object": ((flat & g).sum(1) / flat.sum(1)).double().mean().item(),
            "top 1 % share on object": g.gather(1, top_k).double().mean().item()}


def relax_convergence(
    encoder: nn.Module,
    x: Tensor,
    reference: Tensor,
    n_masks: tuple[int, ...] = (*CONVERGENCE_NS, 3000),
    seed: int = 1000,
    progress: bool = True,
) -> tuple[list[int], Tensor]:
    """Fidelity of an independent RELAX with N masks to ``reference``, for growing N.

    One RELAX run of ``max(n_masks)`` masks in chunks (new seeds, so independent of the reference's masks);
    the chunks' sums combine exactly into the N-mask maps, R_N = Σ M s / Σ M over the first N masks.

    Returns:
        ``(Ns, pearson (len(Ns), B))``; at the largest N this is RELAX's noise ceiling.
    """
    total: RelaxResult | None = None  # the first N masks so far
    done, rows = 0, []
    for i, n in enumerate(tqdm(n_masks, desc="RELAX convergence", disable=not progress)):
        part = relax(encoder, x, n_masks=n - done, seed=seed + i)
        total = part if total is None else total.merge(part)
        rows.append(metrics.pearson(total.importance.float(), reference.to(x.device)).cpu())
        done = n
    return list(n_masks), torch.stack(rows)


def worth_n_masks(ns: list[int], fidelity: Tensor, target: float) -> float:
    """The N at which RELAX's mean fidelity reaches ``target`` (log-linear interpolation between the Ns).

    ``fidelity``: ``(len(ns), B)`` from :func:`relax_convergence`. A target at or below the smallest N's
    fidelity returns ``0.0`` (worth fewer masks than the smallest N measured); above the largest, ``inf``.
    """
    mean = torch.nanmean(fidelity.double(), dim=1).tolist()
    if target <= mean[0]:
        return 0.0
    for i in range(1, len(ns)):
        (n0, f0), (n1, f1) = (ns[i - 1], mean[i - 1]), (ns[i], mean[i])
        if f0 < target <= f1:
            t = (target - f0) / (f1 - f0)
            return float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))))
    return math.inf


def mean_fidelity(scores: dict[str, dict[str, Tensor]], n: int) -> dict[str, float]:
    """Each method's mean Pearson fidelity to RELAX over the first ``n`` images (NaN-aware), the scenes of
    :func:`relax_convergence`, so that it can be read on that curve with :func:`worth_n_masks`."""
    return {m: torch.nanmean(s["fidelity_pearson"][:n].double()).item() for m, s in scores.items()
            if "fidelity_pearson" in s}


def describe_worth(n: float, ns: list[int]) -> str:
    """:func:`worth_n_masks`'s answer in words: ``"< 25 masks"``, ``"36 masks"`` or ``"> 3000 masks"``.

    >>> describe_worth(0.0, [25, 3000]), describe_worth(36.2, [25, 3000]), describe_worth(math.inf, [25, 3000])
    ('< 25 masks', '36 masks', '> 3000 masks')
    """
    if n == 0:
        return f"< {ns[0]} masks"
    return f"> {ns[-1]} masks" if math.isinf(n) else f"{n:,.0f} masks"


def with_encoder(model: NEMU, encoder: nn.Module) -> NEMU:
    """The trained decoder of ``model`` on another encoder of the same architecture (randomisation tests)."""
    dev = next(model.decoder.parameters()).device
    with torch.device(dev):  # the new decoder is built where the trained one lives, not on the default device
        other = NEMU(encoder, uncertainty=model.uncertainty, max_width=model.max_width, min_stride=model.min_stride)
    other.decoder.load_state_dict(model.decoder.state_dict())
    return other.to(dev).eval()


def sanity_check(trained: dict[str, Tensor], randomised: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model randomisation test (Adebayo et al., NeurIPS 2018): Spearman ρ per image between each method's
    maps for the trained encoder and for a randomly initialised one, ``{method: (N,)}``.

    A method whose maps barely change (ρ near 1) explains the image, not the model. The random map is
    skipped (it ignores both).
    """
    return {m: metrics.spearman(trained[m], randomised[m]).cpu() for m in trained if m in randomised
            and m != "random"}


def summarize(scores: dict[str, dict[str, Tensor]], seconds: dict[str, float]) -> list[dict]:
    """Table rows: per method, each metric's mean over images (NaN-aware), its standard error and the
    number of images it is defined for, plus seconds per image."""
    rows = []
    for method, per_metric in scores.items():
        row: dict = {"method": method, "seconds_per_image": seconds.get(method, math.nan)}
        for key, values in per_metric.items():
            v = values[torch.isfinite(values)].double()
            row[key] = v.mean().item() if len(v) else math.nan
            row[f"{key}_sem"] = (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else math.nan
            row[f"{key}_n"] = len(v)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], keys: tuple[str, ...] = tuple(METRICS)) -> str:
    """The table as Markdown: mean ± standard error per metric (↑ higher is better, ↓ lower), seconds per image."""
    head = ["method", *(f"{METRICS[k][0]} {'↑' if METRICS[k][1] else '↓'}" for k in keys), "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["method"]]
        for k in keys:
            mean, sem = row.get(k, math.nan), row.get(f"{k}_sem", math.nan)
            cells.append("–" if not np.isfinite(mean) else f"{mean:.3f} ± {sem:.3f}" if np.isfinite(sem)
                         else f"{mean:.3f}")
        sec = row["seconds_per_image"]
        cells.append(f"{sec:.3g}" if np.isfinite(sec) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
