"""The evaluation of one Shapes encoder on a profile: notebook 04, ``bench/quality.py`` and ``results.md``.

    result = evaluate_encoder("simclr", "cpu")      # every method, every metric, on held-out test scenes
    print(result.markdown)

It loads (or trains) the encoder and its three NEM-U decoders (:mod:`nemu_lib.runs`), explains the first
``eval_images`` test scenes with every method (:func:`nemu_lib.evaluation.explain_all`), scores them
against the main object's mask and against RELAX, measures RELAX's convergence and noise ceiling on the
first ``ceiling_images`` of them, runs the model randomisation test on those too (the same methods on a
randomly initialised encoder of the same architecture, the NEM-U decoders applied as trained; and, stricter,
a NEM-U decoder trained on the random encoder itself), and scores RELAX's reference mode on mosaics. RELAX
runs with ``eval_relax_masks`` masks. What depends on the encoder alone (RELAX is most of the cost) is
saved in ``outputs/evaluation`` and reused while the encoder and the sizes stay the same, so the notebook
and the bench share one run; the decoders' maps (one pass each) are computed on every call,
so retraining a decoder never runs RELAX again.

Notebook 04 also draws on the parts: :func:`mosaic_maps` (one mosaic's four reference-mode maps),
:func:`randomised_maps` (every method for the randomisation test's random encoder, :func:`random_encoder_like`)
and :func:`time_side_by_side` (the encoder, NEM-U and RELAX timed back to back).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import evaluation as ev
from . import metrics, reference
from .budget import announce, forward_gflops
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Profile, get_profile, outputs_dir, seed_everything
from .config import device as default_device
from .data import load_split, mosaic, normalize
from .encoders import Encoder, build_encoder
from .nem import encoder_fingerprint
from .relax import relax
from .runs import RUN_NAMES, pretrained_nemu
from .ssl import pretrained_encoder

CACHE_VERSION = 3  # bump when what the cache holds, or how it is computed, changes


@dataclass
class EncoderEvaluation:
    """Everything notebook 04 shows for one encoder; tensors on the CPU.

    Attributes:
        encoder_kind, profile: what was evaluated.
        images: the scenes in [0, 1] ``(N, 3, H, W)``; objects: their main-object masks ``(N, H, W)`` bool.
        maps: ``{method: (N, H, W)}``; seconds: ``{method: seconds per image}`` (plus ``"encoder"``).
        scores: ``{method: {metric: (N,)}}``; rows: the summary table (:func:`nemu_lib.evaluation.summarize`).
        ns, convergence: fidelity of an independent RELAX with N masks to the reference ``(len(ns), n)``.
        worth: ``{decoder method: N}`` at which RELAX's fidelity reaches the method's.
        sanity: ``{method: Spearman ρ (n,)}`` between maps of the trained and a random encoder; the key
            :data:`RETRAINED` holds NEM-U's with a decoder trained on the random encoder.
        uncertainty: ``{"RELAX": (N, H, W), "amortised RELAX": (N, H, W)}``: RELAX's uncertainty and the
            amortised decoder's prediction of it (in units of each scene's variance of s_k).
        mosaic_share, mosaic_top: RELAX in reference mode on 2x2 mosaics: share of the importance above the
            map's minimum on the queried tile (chance 0.25), and whether that tile ranks first, per query.
    """

    encoder_kind: str
    profile: str
    images: Tensor
    objects: Tensor
    maps: dict[str, Tensor]
    seconds: dict[str, float]
    scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)
    convergence: Tensor | None = None
    worth: dict[str, float] = field(default_factory=dict)
    sanity: dict[str, Tensor] = field(default_factory=dict)
    mosaic_share: Tensor | None = None
    mosaic_top: Tensor | None = None
    uncertainty: dict[str, Tensor] = field(default_factory=dict)

    @property
    def uncertainty_fidelity(self) -> Tensor:
        """Per-scene Pearson r ``(N,)`` between the amortised decoder's uncertainty and RELAX's."""
        return metrics.pearson(self.uncertainty["amortised RELAX"].double(), self.uncertainty["RELAX"].double())

    @property
    def markdown(self) -> str:
        return ev.to_markdown(self.rows)

    def row(self, method: str) -> dict:
        """The table's row of ``method``: ``{metric: mean, metric_sem: standard error, ...}``."""
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(f"no row for {method!r}: the table has {[r['method'] for r in self.rows]}")

    @property
    def speedup(self) -> float:
        """RELAX's seconds per image over NEM-U's, as the evaluation timed them (NaN if either is missing)."""
        return self.seconds.get("RELAX", np.nan) / self.seconds.get("NEM-U", np.nan)


ENCODER_METHODS = tuple(m for m in ev.METHODS if m not in ev.DECODER_METHODS)
SAVED_METHODS = ("RELAX", "U-RELAX")  # what the cache holds (with RELAX's uncertainty): N masked passes per scene
ONE_PASS_METHODS = tuple(m for m in ENCODER_METHODS if m not in SAVED_METHODS)  # cheap: computed on every run
TIMING_IMAGES = 4  # scenes on which RELAX is timed again when its maps were saved (timings are never read from a file)
RETRAINED = "NEM-U (decoder retrained)"  # the stricter randomisation test: a decoder fitted to the random encoder


def cache_path(encoder_kind: str, profile: Profile, seed: int = 0) -> Path:
    """``outputs/evaluation/<kind>-<profile>-seed<seed>.pt``: the encoder-only part of an evaluation."""
    return outputs_dir() / "evaluation" / f"{encoder_kind}-{profile.name}-seed{seed}.pt"


def cache_key(encoder: nn.Module, random_encoder: nn.Module, profile: Profile, seed: int = 0) -> str:
    """What the saved maps depend on: both encoders' weights, the evaluation's sizes, the seed."""
    e = profile.extra
    parts = (CACHE_VERSION, encoder_fingerprint(encoder), encoder_fingerprint(random_encoder), e["eval_images"],
             e["eval_relax_masks"], e["ceiling_images"], e["ig_steps"], e["mosaics"], seed)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def saved_maps(encoder_kind: str, encoder: nn.Module, profile: Profile, seed: int = 0) -> dict | None:
    """The encoder-only part of :func:`evaluate_encoder` saved for this encoder and the profile's sizes, or ``None``.

    ``{"maps": {method: (N, H, W)}, "ns", "convergence", ...}`` as :func:`evaluate_encoder` wrote it; ``None``
    when nothing is saved or it was made from other weights or sizes (:func:`cache_key`).
    """
    return _load_saved(cache_path(encoder_kind, profile, seed),
                       cache_key(encoder, random_encoder_like(encoder, seed), profile, seed))


def _load_saved(path: Path, key: str) -> dict | None:
    """The saved maps at ``path`` if they were made under ``key`` (:func:`cache_key`), else ``None``."""
    if not path.exists():
        return None
    try:
        return load_checkpoint(path, expect={"key": key})
    except ValueError:  # made from another encoder or other sizes
        return None


def _in_method_order(maps: dict[str, Tensor]) -> dict[str, Tensor]:
    return {m: maps[m] for m in ev.METHODS if m in maps}


def mosaic_maps(encoder: nn.Module, mosaic_image: Tensor, tiles: Tensor, n_masks: int,
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """RELAX in reference mode on one 2x2 mosaic ``(3, 2H, 2W)`` of ``tiles (4, 3, H, W)`` (row-major, in [0, 1]).

    The mosaic is explained four times, against r = f(tile q alone) for q = 0..3. Every RELAX map sits on the
    similarity level, so the raw share of a tile is ~0.25 whatever the map shows: each map's minimum is
    subtracted first.

    Returns:
        ``above (4, 2H, 2W)``: query q's importance above its minimum (on the CPU); ``share (4,)``: the share
        of it on the queried tile (chance 0.25); ``top (4,)`` bool: whether the queried tile has the largest sum.
    """
    dev = next(encoder.parameters()).device
    xm = normalize(mosaic_image[None], encoder.mean, encoder.std).to(dev)  # (1, C, 2H, 2W)
    x_tiles = normalize(tiles, encoder.mean, encoder.std).to(dev)  # (4, C, H, W)
    with torch.inference_mode():
        refs = encoder(x_tiles)  # (4, D): r = f(tile alone), row-major like the grid
    imp = relax(encoder, xm.expand(4, -1, -1, -1), n_masks=n_masks, reference=refs, seed=seed).importance
    above = (imp - imp.flatten(1).min(1).values[:, None, None]).cpu()  # (4, 2H, 2W)
    tiles_mean = metrics.tile_means(above, 2)  # (4 queries, 4 tiles), row-major like the grid; equal tile sizes
    return above, tiles_mean.diagonal() / tiles_mean.sum(1), tiles_mean.argmax(1) == torch.arange(4)


def mosaic_locality(
    encoder: nn.Module, images: Tensor, n_mosaics: int, n_masks: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """RELAX in reference mode on 2x2 mosaics of ``images`` (in [0, 1]): "why is the mosaic like tile q?".

    Mosaic m is ``data.mosaic(images, k=2, num=n_mosaics, generator=seed)[m]``, explained by :func:`mosaic_maps`
    with the seed ``seed + m``.

    Returns:
        ``(share (4 n_mosaics,), top (4 n_mosaics,) bool)``: importance above the map's minimum on the
        queried tile, and whether the queried tile has the highest mean importance.
    """
    mosaics, sources = mosaic(images, k=2, num=n_mosaics, generator=torch.Generator().manual_seed(seed))
    share, top = [], []
    for m in range(n_mosaics):
        _, s, t = mosaic_maps(encoder, mosaics[m], images[sources[m].flatten()], n_masks, seed=seed + m)
        share.append(s)
        top.append(t)
    return torch.cat(share), torch.cat(top)


def random_encoder_like(encoder: nn.Module, seed: int = 0) -> nn.Module:
    """A randomly initialised encoder of ``encoder``'s architecture, in eval mode on its device: the model of the
    randomisation test. Seeds everything with ``seed`` first, so the same seed gives the same weights."""
    dev = next(encoder.parameters()).device
    seed_everything(seed)
    return build_encoder(**encoder.config).to(dev).eval()


def randomised_maps(encoder_kind: str, profile: str | Profile | None, images: Tensor, seed: int = 0,
                    device: str | torch.device | None = None, methods: tuple[str, ...] = ev.METHODS,
                    n_masks: int | None = None) -> dict[str, Tensor]:
    """Every method's maps of ``images (B, 3, H, W)`` (in [0, 1]) for the randomly initialised encoder of the
    randomisation test, built as :func:`evaluate_encoder` builds it: ``{method: (B, H, W)}`` on the CPU.

    The NEM-U decoders are the trained ones of ``encoder_kind``, applied as trained to the random encoder;
    :data:`RETRAINED` (if in ``methods``) is the NEM-U decoder trained on the random encoder itself.
    RELAX uses the profile's ``eval_relax_masks`` unless ``n_masks`` is given.
    """
    p = get_profile(profile)
    dev = default_device(device)
    encoder = pretrained_encoder(encoder_kind, p, seed=seed, device=dev, progress=False)
    decoders = {obj: pretrained_nemu(encoder_kind, obj, p, seed=seed, encoder=encoder, device=dev, progress=False)
                for obj in RUN_NAMES}
    random_encoder = random_encoder_like(encoder, seed)
    randomised = {k: ev.with_encoder(d, random_encoder) for k, d in decoders.items()}
    x = normalize(images, encoder.mean, encoder.std).to(dev)
    maps, _ = ev.explain_all(random_encoder, randomised, x, n_masks=n_masks or p.extra["eval_relax_masks"],
                             ig_steps=p.extra["ig_steps"], seed=seed, methods=methods, progress=False)
    if RETRAINED in methods:
        maps[RETRAINED] = _retrained_maps(random_encoder, x, p, seed, dev, progress=False)
    return {m: v.cpu() for m, v in maps.items()}


def _retrained_maps(random_encoder: Encoder, x: Tensor, p: Profile, seed: int, dev: torch.device,
                    progress: bool) -> Tensor:
    """NEM-U's masks ``(B, H, W)`` from a decoder trained (profile's ``nem`` settings) on ``random_encoder``.

    The random encoder is :func:`nemu_lib.ssl.pretrained_encoder` ``("random")`` (the same seed, the same
    weights), so its decoder lives in ``outputs/nemu/random-nem-<profile>`` and serves every encoder kind.
    """
    model = pretrained_nemu("random", "nem", p, seed=seed, encoder=random_encoder, device=dev, progress=progress)
    maps, _ = ev.explain_all(random_encoder, {"nem": model}, x, methods=("NEM-U",), progress=False)
    return maps["NEM-U"]


def time_side_by_side(encoder: nn.Module, model: nn.Module, x: Tensor, n_masks: int, seed: int = 0,
                      repeats: int = 5) -> dict[str, float]:
    """Seconds per image of the encoder, a NEM-U ``model`` and RELAX with ``n_masks`` masks, timed back to back.

    The encoder and the model: the median of ``repeats`` calls on ``x (B, C, H, W)`` (normalised) after a
    warm-up (:func:`nemu_lib.metrics.time_per_image`); RELAX: one call on ``x[:1]``, once. Timings taken
    minutes apart move with the machine's load; ratios of these are comparable.
    """
    with torch.inference_mode():
        t_enc = metrics.time_per_image(encoder, x, repeats=repeats).seconds_per_image
        t_nem = metrics.time_per_image(model, x, repeats=repeats).seconds_per_image
    t_relax = metrics.time_per_image(lambda xb: relax(encoder, xb, n_masks=n_masks, seed=seed), x[:1],
                                     warmup=0, repeats=1).seconds_per_image
    return {"encoder": t_enc, "NEM-U": t_nem, "RELAX": t_relax}


def evaluate_encoder(
    encoder_kind: str,
    profile: str | Profile | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    recompute: bool = False,
    progress: bool = True,
) -> EncoderEvaluation:
    """Evaluate every method on ``encoder_kind``'s explanations of the profile's held-out test scenes.

    Sizes from ``profile.extra``: ``eval_images`` scenes, ``relax_masks`` (N), ``ceiling_images`` (RELAX's
    convergence and the randomisation test), ``ig_steps``, ``deletion_steps``, ``mosaics``. The encoder-only maps
    are saved in ``outputs/evaluation`` (or taken from the shipped reference, :mod:`nemu_lib.reference`);
    ``recompute`` ignores both.
    """
    p = get_profile(profile)
    dev = default_device(device)
    e = p.extra
    n, n_masks, n_ceiling = e["eval_images"], e["eval_relax_masks"], e["ceiling_images"]
    encoder = pretrained_encoder(encoder_kind, p, seed=seed, device=dev, progress=progress)
    decoders = {obj: pretrained_nemu(encoder_kind, obj, p, seed=seed, encoder=encoder, device=dev, progress=progress)
                for obj in RUN_NAMES}
    test = load_split("test", p)
    images, objects = test["image"][:n], test["object_mask"][:n].bool()
    x = normalize(images, encoder.mean, encoder.std).to(dev)
    random_encoder = random_encoder_like(encoder, seed)  # the same architecture, initialisation only

    path, key = cache_path(encoder_kind, p, seed), cache_key(encoder, random_encoder, p, seed)
    if not recompute:  # nothing computed here yet: the shipped reference maps when they match
        reference.adopt(path, expect={"key": key})
    cached = None if recompute else _load_saved(path, key)  # else computed (again)
    common = dict(n_masks=n_masks, ig_steps=e["ig_steps"], seed=seed, progress=progress)
    if cached is not None:  # timings are this machine's: RELAX timed again on a few scenes
        _, cached["seconds"] = ev.explain_all(encoder, {}, x[:TIMING_IMAGES], methods=SAVED_METHODS, **common)
    else:
        if progress:  # RELAX on every scene, its convergence and the random encoder, the mosaics (4x the pixels)
            copies = (n + 2 * n_ceiling) * n_masks + 4 * 4 * e["mosaics"] * (n_masks // 2)
            announce(f"{encoder_kind}: the encoder-only maps ({copies:,} masked copies for RELAX)",
                     forward_gflops(encoder, x[:1]), infer_images=copies, calls=copies // 100, device=dev)
        maps, seconds = ev.explain_all(encoder, {}, x, methods=(*SAVED_METHODS, ev.RELAX_UNCERTAINTY), **common)
        ns, convergence = ev.relax_convergence(encoder, x[:n_ceiling], maps["RELAX"][:n_ceiling].to(dev),
                                               n_masks=tuple(k for k in ev.CONVERGENCE_NS if k < n_masks) + (n_masks,),
                                               seed=seed + 1000, progress=progress)
        random_maps, _ = ev.explain_all(random_encoder, {}, x[:n_ceiling], methods=SAVED_METHODS, **common)
        mosaic_share, mosaic_top = mosaic_locality(encoder, test["image"][n:n + 64], e["mosaics"], n_masks // 2, seed)
        cached = {"config": {"key": key}, "maps": maps, "seconds": seconds, "ns": ns, "convergence": convergence,
                  "random_maps": random_maps, "mosaic_share": mosaic_share, "mosaic_top": mosaic_top}
        save_checkpoint(cached, path)

    # the one-pass maps (the gradient methods, the random map, the decoders'), on the trained encoder and on the
    # random one (the decoders as trained): computed on every run, they cost seconds
    one_pass, one_pass_seconds = ev.explain_all(encoder, {}, x, methods=ONE_PASS_METHODS, **common)
    one_pass_seconds["encoder"] = metrics.time_per_image(encoder.eval(), x[:64], repeats=5).seconds_per_image
    random_one_pass, _ = ev.explain_all(random_encoder, {}, x[:n_ceiling], methods=ONE_PASS_METHODS, **common)
    decoder_methods = tuple(ev.DECODER_METHODS)
    decoder_maps, decoder_seconds = ev.explain_all(encoder, decoders, x,
                                                   methods=(*decoder_methods, ev.AMORTISED_UNCERTAINTY), **common)
    randomised = {k: ev.with_encoder(d, random_encoder) for k, d in decoders.items()}
    random_decoder_maps, _ = ev.explain_all(random_encoder, randomised, x[:n_ceiling], methods=decoder_methods,
                                            **common)
    maps = _in_method_order(cached["maps"] | one_pass | decoder_maps)
    seconds = cached["seconds"] | one_pass_seconds | decoder_seconds
    random_maps = _in_method_order(cached["random_maps"] | random_one_pass | random_decoder_maps)
    scores = ev.score_maps(encoder, x, objects.to(dev), maps, reference=maps["RELAX"], steps=e["deletion_steps"],
                           progress=progress)
    # RELAX against itself is 1 by construction: its row shows the independent run's agreement instead
    ceiling = cached["convergence"][-1].double()
    scores["RELAX"]["fidelity_pearson"] = torch.cat([ceiling, torch.full((n - n_ceiling,), float("nan"))])
    scores["RELAX"].pop("fidelity_spearman")
    trained_sub = {m: v[:n_ceiling] for m, v in maps.items()}
    sanity = ev.sanity_check(trained_sub, random_maps)
    retrained = _retrained_maps(random_encoder, x[:n_ceiling], p, seed, dev, progress)
    sanity[RETRAINED] = ev.sanity_check({"NEM-U": trained_sub["NEM-U"]}, {"NEM-U": retrained})["NEM-U"]
    uncertainty = {"RELAX": cached["maps"][ev.RELAX_UNCERTAINTY],
                   "amortised RELAX": decoder_maps[ev.AMORTISED_UNCERTAINTY]}
    fidelity = ev.mean_fidelity(scores, n_ceiling)
    worth = {m: ev.worth_n_masks(cached["ns"], cached["convergence"], fidelity[m])
             for m in ev.DECODER_METHODS if m in scores}
    return EncoderEvaluation(
        encoder_kind, p.name, images, objects, maps, seconds, scores, ev.summarize(scores, seconds),
        cached["ns"], cached["convergence"], worth, sanity, cached["mosaic_share"], cached["mosaic_top"], uncertainty,
    )


def results_record(evaluations: list[EncoderEvaluation]) -> dict:
    """What ``outputs/results/<profile>/04_evaluation.json`` holds: the table per encoder and the headline figures."""
    out: dict = {}
    for r in evaluations:
        out[r.encoder_kind] = {
            "table": r.rows,
            "speedup_nemu_vs_relax": r.speedup,
            "relax_noise_ceiling_pearson": float(r.convergence[-1].mean()),
            "nemu_worth_n_masks": r.worth,
            "amortised_relax_median_pearson": float(r.scores["amortised RELAX"]["fidelity_pearson"].nanmedian()),
            "amortised_relax_uncertainty_median_pearson": float(r.uncertainty_fidelity.nanmedian()),
            "sanity_median_spearman": {m: float(v.median()) for m, v in r.sanity.items()},
            "mosaic_share_on_queried_tile": float(r.mosaic_share.mean()),
            "mosaic_queried_tile_first": float(r.mosaic_top.float().mean()),
        }
    return out
