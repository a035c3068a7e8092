"""Every computing function keeps to its inputs' device: no tensor is created without naming one.

Each test builds its model and inputs on the ``device`` fixture's device (``cpu``, plus ``cuda`` when present)
*outside* :func:`stray_tensor_guard` (a module built under it would get ``meta`` parameters), then makes the
call inside it: a tensor the library creates without a device lands on ``meta`` and fails to mix with the
inputs, as a CPU tensor would with CUDA inputs. Outputs are checked for device, dtype and shape; where the
documentation says a result comes back on the CPU (dissection's counts, the evaluation tables, ``embed``),
that is what is checked.

Also here: resuming a NEM-U run from a checkpoint whose tensors were loaded onto another device than the one
they were saved from (the RNG state restored from a ``map_location="cuda"`` load crashed on a GPU).
"""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from conftest import stray_tensor_guard
from torch import Tensor
from torch.testing import assert_close
from torch.utils._pytree import tree_map_only

from nemu_lib import augment, baselines, data, encoders, evaluation, metrics, nem, probes, ssl
from nemu_lib import train as train_module
from nemu_lib.config import exact_float32
from nemu_lib.dissection import RotatedUnits, TailQuantile, dissect, random_rotation
from nemu_lib.encoders import SmallResNet, build_encoder
from nemu_lib.masks import mask_batches, relax_masks
from nemu_lib.nem import NEMU, OBJECTIVES, UNetDecoder, build_objective
from nemu_lib.relax import relax
from nemu_lib.train import CHECKPOINT, TrainConfig, load_nemu, train, validation_loss

SIZE = 32  # px: every image here is 32 x 32


def _encoder(device: torch.device, seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet((4, 8, 8, 8)).eval().to(device)


def _images(device: torch.device, n: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)


def _maps(device: torch.device, n: int = 2, seed: int = 2) -> tuple[Tensor, Tensor]:
    """Maps ``(n, H, W)`` and non-empty ground-truth masks ``(n, H, W)`` bool."""
    a = torch.rand(n, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
    gt = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    gt[:, 4:12, 6:14] = True
    return a, gt.to(device)


def _on(device: torch.device, *tensors: Tensor) -> bool:
    return all(t.device.type == device.type for t in tensors)


# ----------------------------------------------------------------------------------------- masks, relax

def test_relax_masks_on_the_generators_or_the_given_device(device):
    gen = torch.Generator(device).manual_seed(0)
    with stray_tensor_guard():
        drawn = relax_masks(3, (SIZE, SIZE), generator=gen)
        given = relax_masks(3, (SIZE, SIZE), device=device)
        batches = list(mask_batches(5, 2, (SIZE, SIZE), device=device))
    for m in (drawn, given, *batches):
        assert _on(device, m) and m.dtype == torch.float32 and m.shape[1:] == (1, SIZE, SIZE)
    assert [len(m) for m in batches] == [2, 2, 1]


@pytest.mark.parametrize("kwargs", [{}, {"reference": "vector"}, {"masks": "tensor"}])
def test_relax_and_its_fields_on_the_device_of_x(device, kwargs):
    encoder, x = _encoder(device), _images(device)
    if kwargs.get("reference"):
        kwargs = {"reference": torch.randn(8, generator=torch.Generator().manual_seed(3)).to(device)}
    elif kwargs.get("masks"):
        kwargs = {"masks": relax_masks(6, (SIZE, SIZE), generator=torch.Generator().manual_seed(4)).to(device)}
    with stray_tensor_guard():
        r = relax(encoder, x, n_masks=6, batch_size=4, **kwargs)
        fields = {"importance": r.importance, "uncertainty": r.uncertainty, "u_relax": r.u_relax,
                  "uncertainty_reference": r.uncertainty_reference}
        mask = r.u_relax_mask
    for name, t in fields.items():
        assert _on(device, t) and t.dtype == torch.float64 and t.shape == (2, SIZE, SIZE), name
    assert _on(device, r.weights, mask) and r.weights.dtype == torch.float64 and mask.dtype == torch.bool
    assert r.n_masks == 6 and torch.isfinite(r.importance).all()


# ------------------------------------------------------------------------------------------------- NEM-U

@pytest.mark.parametrize("uncertainty", [False, True])
def test_nemu_forward_explain_and_decoder(device, uncertainty):
    encoder, x = _encoder(device), _images(device)
    model = NEMU(encoder, uncertainty=uncertainty).to(device)
    decoder = UNetDecoder(encoder.feature_channels, encoder.feature_strides, out_channels=2).to(device)
    maps = encoder.features(x)
    with stray_tensor_guard():
        z, m = model(x)
        _, m2, u = model.explain(x)
        logits = decoder(maps, (SIZE, SIZE))
    assert _on(device, z, m, m2, logits) and z.shape == (2, 8) and m.shape == (2, 1, SIZE, SIZE)
    assert logits.shape == (2, 2, SIZE, SIZE) and m.dtype == torch.float32
    assert (u is not None) == uncertainty and (u is None or (_on(device, u) and u.shape == m.shape))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_on_the_device_of_x(device, objective):
    model = NEMU(_encoder(device), uncertainty=objective == "relax").to(device).train()
    obj, x = build_objective(objective, **({"n_masks": 3} if objective == "relax" else {})), _images(device)
    with stray_tensor_guard():
        loss, stats = obj(model, x, torch.Generator(device).manual_seed(1))
        loss.backward()
    assert _on(device, loss, *stats.values()) and loss.ndim == 0
    assert set(stats) == set(obj.stat_names) and math.isfinite(loss.item())
    assert model.decoder.head.weight.grad is not None and _on(device, model.decoder.head.weight.grad)


def test_losses_on_the_device_of_their_inputs(device):
    g = torch.Generator().manual_seed(5)
    z, z_keep, z_drop = (torch.randn(3, 8, generator=g).to(device) for _ in range(3))
    m = torch.rand(3, 1, SIZE, SIZE, generator=g).to(device)
    masks, s = torch.rand(3, 4, SIZE, SIZE, generator=g).to(device), torch.rand(3, 4, generator=g).to(device)
    with stray_tensor_guard():
        out = [nem.cos_distance(z, z_keep), nem.nem_loss(z, z_keep, m), nem.nem_contrastive_loss(z, z_keep, z_drop, m),
               *nem.amortised_relax_loss(m, m, masks, s), *nem.amortised_relax_loss(m, None, masks, s)]
    assert _on(device, *out) and out[0].shape == (3,) and all(t.ndim == 0 for t in out[1:])
    assert out[-1].item() == 0  # no log-variance head: no variance loss


# ------------------------------------------------------------------------------------------------- train

TINY = TrainConfig(steps=2, batch_size=4, lr=1e-2, relax_masks=2)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_train_validation_and_load_on_the_device(device, tmp_path, objective):
    encoder = _encoder(device)
    model = NEMU(encoder, uncertainty=objective == "relax").to(device)
    cfg = dataclasses.replace(TINY, objective=objective)
    x, v = _images(device, 8), _images(device, 4, seed=2)
    before = {k: w.clone() for k, w in model.decoder.state_dict().items()}
    with stray_tensor_guard():
        history = train(model, x, v, cfg, tmp_path, val_every=2, progress=False)
        val = validation_loss(model, v, cfg)
        loaded = load_nemu(tmp_path / CHECKPOINT, encoder, map_location=device)
        z, m = loaded(x[:2])
    assert len(history["loss"]) == 2 and all(math.isfinite(h) for h in history["loss"] + [val])
    assert any(not torch.equal(w, before[k]) for k, w in model.decoder.state_dict().items())
    assert all(_on(device, p) for p in loaded.parameters()), "the loaded decoder must sit beside the encoder"
    assert _on(device, z, m) and m.shape == (2, 1, SIZE, SIZE)
    for k, w in model.decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[k], w), k


class _Elsewhere(Tensor):
    """A tensor that says it lives on ``cuda:0`` (its data stays on the CPU): what ``torch.load`` returns with
    ``map_location="cuda"``, on a machine without a GPU.

    Metadata checks see the CUDA device: ``torch.set_rng_state`` raises "RNG state must be a torch.ByteTensor"
    and ``.numpy()`` refuses, as they do for a real CUDA tensor. Operations run on the CPU data and return
    plain CPU tensors, so ``.cpu()``, ``load_state_dict`` and the optimiser's state loading work as on a GPU.
    """

    @staticmethod
    def __new__(cls, data: Tensor) -> "_Elsewhere":
        return Tensor._make_wrapper_subclass(cls, data.shape, strides=data.stride(), dtype=data.dtype,
                                             device="cuda:0", requires_grad=data.requires_grad)

    def __init__(self, data: Tensor) -> None:
        self.data_on_cpu = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.data_on_cpu  # noqa: E731
        return func(*tree_map_only(cls, unwrap, args), **tree_map_only(cls, unwrap, kwargs or {}))


def test_resume_from_a_checkpoint_loaded_onto_another_device_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """Every tensor of the checkpoint comes back 'on cuda:0' (see :class:`_Elsewhere`): the RNG states must be
    moved back to the CPU before they are restored (the old ``torch.set_rng_state(state["torch"])`` raised), the
    resumed run still equals the uninterrupted one exactly, and so do the RNG states it ends with."""
    cfg = dataclasses.replace(TINY, steps=4, objective="relax")
    encoder, x, v = _encoder("cpu"), _images("cpu", 8), _images("cpu", 4, seed=2)

    def model() -> NEMU:
        torch.manual_seed(1)
        return NEMU(encoder, uncertainty=True)

    full = model()
    h_full = train(full, x, v, cfg, tmp_path / "full", val_every=2, progress=False)
    end_full = train_module._rng_state()  # the RNG states an uninterrupted run ends with
    part = model()
    train(part, x, v, cfg, tmp_path / "part", val_every=2, stop_at=2, progress=False)
    load = torch.load
    loaded = []

    def load_elsewhere(*args, **kwargs):
        ckpt = tree_map_only(Tensor, _Elsewhere, load(*args, **kwargs))
        loaded.append(ckpt)
        return ckpt

    resumed = model()
    torch.manual_seed(123)  # this process's RNGs differ from the run's: only the checkpoint can bring them back
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 (the legacy global state that the checkpoint holds)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", load_elsewhere)
        h_resumed = train(resumed, x, v, cfg, tmp_path / "part", val_every=2, resume=True, progress=False)
    assert loaded and isinstance(loaded[0]["rng"]["torch"], _Elsewhere)
    assert loaded[0]["rng"]["torch"].device.type == "cuda"
    assert h_resumed == h_full
    for k, w in full.decoder.state_dict().items():
        assert torch.equal(resumed.decoder.state_dict()[k], w), k
    end_resumed = train_module._rng_state()
    assert torch.equal(end_resumed["torch"], end_full["torch"]) and end_resumed["python"] == end_full["python"]
    assert torch.equal(end_resumed["numpy"][1], end_full["numpy"][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_resume_on_cuda_equals_an_uninterrupted_run(tmp_path):
    """Saved on CUDA, resumed with ``map_location="cuda"`` (train loads onto the model's device). cuDNN is not
    bit-exact from run to run (its algorithm choice and atomics), so the comparison has a tolerance."""
    dev = torch.device("cuda")
    cfg = dataclasses.replace(TINY, steps=4, objective="relax")
    encoder, x, v = _encoder(dev), _images(dev, 8), _images(dev, 4, seed=2)

    def model() -> NEMU:
        torch.manual_seed(1)
        return NEMU(encoder, uncertainty=True).to(dev)

    full = model()
    h_full = train(full, x, v, cfg, tmp_path / "full", val_every=2, progress=False)
    part = model()
    train(part, x, v, cfg, tmp_path / "part", val_every=2, stop_at=2, progress=False)
    resumed = model()
    h_resumed = train(resumed, x, v, cfg, tmp_path / "part", val_every=2, resume=True, progress=False)
    assert h_resumed["step"] == h_full["step"]
    assert_close(h_resumed["loss"], h_full["loss"], atol=1e-5, rtol=0)
    for k, w in full.decoder.state_dict().items():
        assert_close(resumed.decoder.state_dict()[k], w, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------- metrics

@pytest.mark.parametrize("metric", ["relevance_mass_accuracy", "relevance_rank_accuracy", "pointing_game"])
def test_locality_metrics_on_the_device_of_the_maps(device, metric):
    a, gt = _maps(device)
    with stray_tensor_guard():
        scores = [getattr(metrics, metric)(a, gt), getattr(metrics, metric)(a, gt.float())]  # bool and 0/1 masks
    for s in scores:
        assert _on(device, s) and s.dtype == torch.float64 and s.shape == (2,) and torch.isfinite(s).all()


@pytest.mark.parametrize("metric", ["complexity", "sparseness", "pearson", "spearman"])
def test_map_metrics_on_the_device_of_the_maps(device, metric):
    a, _ = _maps(device)
    b, _ = _maps(device, seed=3)
    with stray_tensor_guard():
        s = getattr(metrics, metric)(a, b) if metric in ("pearson", "spearman") else getattr(metrics, metric)(a)
    assert _on(device, s) and s.dtype == torch.float64 and s.shape == (2,) and torch.isfinite(s).all()


def test_deletion_insertion_on_the_device_of_x(device):
    encoder, x = _encoder(device), _images(device)
    a, _ = _maps(device)
    with stray_tensor_guard():
        c = metrics.deletion_insertion(encoder, x, a, steps=4, batch_size=7)
        aucs = c.deletion_auc, c.insertion_auc
    assert _on(device, c.fractions, c.deletion, c.insertion, *aucs)
    assert c.deletion.dtype == c.insertion.dtype == c.fractions.dtype == torch.float64
    assert c.deletion.shape == c.insertion.shape == (2, 5) and aucs[0].shape == (2,)
    assert_close(c.deletion[:, 0], torch.ones(2, dtype=torch.float64, device=device), atol=1e-5, rtol=0)


def test_time_per_image(device):
    encoder, x = _encoder(device), _images(device)
    with stray_tensor_guard():
        t = metrics.time_per_image(encoder, x, warmup=1, repeats=2)
    assert t.batch == 2 and len(t.seconds) == 2 and t.seconds_per_image > 0
    assert t.images_per_second == pytest.approx(1 / t.seconds_per_image)


# --------------------------------------------------------------------------------------------- baselines

@pytest.mark.parametrize("method", sorted(baselines.QUADRATURES))
def test_integrated_gradients_on_the_device_of_x(device, method):
    encoder, x = _encoder(device), _images(device)
    with stray_tensor_guard():
        ig, gap = baselines.label_free_integrated_gradients(encoder, x, steps=3, method=method, batch_size=4,
                                                            return_gap=True)
    assert _on(device, ig, gap) and ig.dtype == torch.float32 and ig.shape == (2, SIZE, SIZE) and gap.shape == (2,)


def test_gradient_and_random_map_on_the_device_of_x(device):
    encoder, x = _encoder(device), _images(device)
    gen = torch.Generator(device).manual_seed(0)
    with stray_tensor_guard():
        maps = [baselines.label_free_gradient(encoder, x), baselines.label_free_integrated_gradients(encoder, x, 0.5,
                steps=2), baselines.random_map(x), baselines.random_map(x, generator=gen)]
    for m in maps:
        assert _on(device, m) and m.dtype == torch.float32 and m.shape == (2, SIZE, SIZE)


# -------------------------------------------------------------------------------------------- dissection

@pytest.fixture(scope="module")
def scenes() -> tuple[Tensor, Tensor]:
    s = data.ShapesScenes("val", size=6, image_size=SIZE).stack(progress=False)
    return data.normalize(s["image"]), data.concept_masks(s["concepts"])  # (6, 3, 32, 32), (6, 18, 32, 32)


@pytest.mark.parametrize("max_tail", [16384, 8])  # exact thresholds, and subsampled positions
def test_dissect_on_the_device_with_its_counts_on_the_cpu(device, scenes, max_tail):
    encoder = _encoder(device)
    x, labels = (t.to(device) for t in scenes)
    with exact_float32(), stray_tensor_guard():  # no TF32 on a GPU: the thresholds are compared with the CPU's
        out = dissect(encoder, x, labels, layers=["stage1", -1], batch_size=4, max_tail=max_tail, n_top=3,
                      progress=False)
    for r in out.values():  # documented: counts in float64 on the CPU
        assert r.iou.device.type == r.thresholds.device.type == r.top_images.device.type == "cpu"
        assert r.iou.dtype == torch.float64 and r.thresholds.dtype == torch.float32 and r.top_images.shape[1] == 3
        assert ((r.iou >= 0) & (r.iou <= 1)).all()
    if device.type != "cpu":  # the same dissection as on the CPU
        ref = dissect(_encoder("cpu"), *scenes, layers=["stage1", -1], batch_size=4, max_tail=max_tail, n_top=3,
                      progress=False)
        for name, r in out.items():
            assert_close(r.thresholds, ref[name].thresholds, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("max_tail", [16384, 8])
def test_tail_quantile_on_the_device_of_the_activations(device, max_tail):
    a = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)).to(device)
    tail = TailQuantile(4, 2 * 3 * 25, 0.05, max_tail=max_tail)
    with stray_tensor_guard():
        tail.update(a)
        tail.update(a * 2)
        t = tail.quantile()
    assert _on(device, t, tail.values) and t.shape == (4,) and t.dtype == torch.float32


def test_rotated_units_beside_the_encoder(device):
    encoder, x = _encoder(device), _images(device)
    with stray_tensor_guard():  # the rotations are drawn on the CPU (the same Q everywhere), then moved
        rotated = RotatedUnits(encoder, layers=["stage1", -1])
        z, maps = rotated.forward_features(x)
    assert _on(device, *rotated.buffers(), z, *maps)
    assert_close(rotated.q1.cpu(), random_rotation(encoder.feature_channels[1], 0))
    assert [m.shape[1] for m in maps] == list(encoder.feature_channels)


def test_rotated_units_follow_an_encoder_on_another_device(monkeypatch):
    """The rotations are drawn on the CPU on purpose, which the guard cannot tell from right: ``meta`` stands in
    for a GPU here (shapes propagate through the encoder), and a rotation left on the CPU fails to mix."""
    monkeypatch.setattr(encoders, "check_images", lambda x, **_: x)  # its finiteness check reads values
    encoder, x = _encoder("cpu").to("meta"), torch.empty(2, 3, SIZE, SIZE, device="meta")
    rotated = RotatedUnits(encoder, layers=["stage1", -1])
    z, maps = rotated.forward_features(x)
    assert all(b.device.type == "meta" for b in rotated.buffers()) and z.device.type == "meta"
    assert [tuple(m.shape) for m in maps] == [tuple(m.shape) for m in _encoder("cpu").features(_images("cpu"))]


# -------------------------------------------------------------------------------------------- evaluation

def test_explain_all_gives_both_uncertainties_and_where_the_maximum_is_reads_maps_on_any_device(device):
    encoder, x = _encoder(device), _images(device)
    _, gt = _maps(device)
    torch.manual_seed(1)
    decoders = {"relax": NEMU(encoder, uncertainty=True).to(device)}
    methods = ("RELAX", evaluation.RELAX_UNCERTAINTY, evaluation.AMORTISED_UNCERTAINTY)
    with stray_tensor_guard():
        maps, _ = evaluation.explain_all(encoder, decoders, x, n_masks=8, methods=methods, progress=False)
        where = evaluation.where_the_maximum_is(maps["RELAX"].to(device), gt)
    assert tuple(maps) == methods
    for name, m in maps.items():
        assert m.device.type == "cpu" and m.dtype == torch.float32 and m.shape == (2, SIZE, SIZE), name
    assert (maps[evaluation.RELAX_UNCERTAINTY] >= 0).all() and (maps[evaluation.AMORTISED_UNCERTAINTY] > 0).all()
    assert all(0 <= v <= SIZE * SIZE for v in where.values())


def test_explain_all_and_score_maps_give_their_tables_on_the_cpu(device):
    encoder, x = _encoder(device), _images(device)
    _, gt = _maps(device)
    torch.manual_seed(1)
    decoders = {"nem": NEMU(encoder).to(device), "relax": NEMU(encoder, uncertainty=True).to(device)}
    with stray_tensor_guard():
        maps, seconds = evaluation.explain_all(encoder, decoders, x, n_masks=8, ig_steps=2, progress=False)
        scores = evaluation.score_maps(encoder, x, gt, maps, reference=maps["RELAX"], steps=4, progress=False)
        ns, fidelity = evaluation.relax_convergence(encoder, x, maps["RELAX"].to(device), n_masks=(4, 8),
                                                    progress=False)
        rho = evaluation.sanity_check(maps, maps)
    assert set(maps) == {"NEM-U", "amortised RELAX", "RELAX", "U-RELAX", "label-free gradient", "label-free IG",
                         "random"}
    for name, m in maps.items():  # documented: float32 maps on the CPU
        assert m.device.type == "cpu" and m.dtype == torch.float32 and m.shape == (2, SIZE, SIZE), name
        assert seconds[name] > 0
    for name, per_metric in scores.items():  # documented: {method: {metric: (N,) float64}}, on the CPU
        assert set(per_metric) == set(evaluation.METRICS), name
        assert all(s.device.type == "cpu" and s.dtype == torch.float64 and s.shape == (2,) for s in per_metric.values())
    assert ns == [4, 8] and fidelity.shape == (2, 2) and fidelity.device.type == "cpu"
    assert "random" not in rho and all(r.device.type == "cpu" for r in rho.values())
    rows = evaluation.summarize(scores, seconds)
    assert len(rows) == len(maps) and all(isinstance(r["relevance_mass"], float) for r in rows)


def test_with_encoder_builds_the_decoder_beside_the_trained_one(device):
    torch.manual_seed(1)
    model = NEMU(_encoder(device), uncertainty=True).to(device)
    other_encoder, x = _encoder(device, seed=3), _images(device)
    with stray_tensor_guard():
        other = evaluation.with_encoder(model, other_encoder)
        z, m = other(x)
    assert all(_on(device, p) for p in other.parameters()) and _on(device, z, m)
    assert torch.equal(other.decoder.head.weight, model.decoder.head.weight)


# ------------------------------------------------------------------------------------------------ ssl

def test_simclr_augment_on_the_device_of_the_images(device):
    aug = augment.SimCLRAugment(SIZE, (0.45,) * 3, (0.2,) * 3, p_blur=1.0).to(device)
    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(0)).to(device)
    with stray_tensor_guard():
        views = aug(images)
    assert _on(device, views) and views.dtype == torch.float32 and views.shape == (4, 3, SIZE, SIZE)


def test_nt_xent_on_the_device_of_the_projections(device):
    p1, p2 = (torch.randn(4, 8, generator=torch.Generator().manual_seed(i)).to(device) for i in range(2))
    with stray_tensor_guard():
        loss = ssl.nt_xent(p1, p2, 0.5)
    assert _on(device, loss) and loss.ndim == 0


def test_embed_gives_cpu_features_and_the_probes_floats(device):
    encoder, x = _encoder(device), _images(device, 6)
    with stray_tensor_guard():
        z = probes.embed(encoder, x, batch_size=4)  # documented: on the CPU
    assert z.device.type == "cpu" and z.dtype == torch.float32 and z.shape == (6, 8)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    acc = probes.linear_probe(z[:4].to(device), y[:4].to(device), z[4:].to(device), y[4:].to(device))
    assert isinstance(acc, float) and 0 <= acc <= 1


def test_knn_accuracy_on_the_device_of_the_features(device):
    z = torch.randn(6, 8, generator=torch.Generator().manual_seed(0)).to(device)
    y = torch.tensor([0, 1, 0, 1, 0, 1], device=device)
    with stray_tensor_guard():
        acc = probes.knn_accuracy(z, y, z, y, k=3)
    assert isinstance(acc, float) and 0 <= acc <= 1


# ------------------------------------------------------------------------------------------ encoders, data

@pytest.mark.parametrize("name", ["small_resnet", "resnet18"])
def test_encoders_on_their_device(device, name):
    torch.manual_seed(0)
    encoder = build_encoder(name, **({"widths": (4, 8, 8, 8)} if name == "small_resnet" else {})).eval().to(device)
    x = _images(device)
    with stray_tensor_guard():
        z, maps = encoder.forward_features(x)
        z2, maps2 = encoder(x), encoder.features(x)
    assert _on(device, z, z2, *maps, *maps2) and z.shape == (2, encoder.embed_dim) and z.dtype == torch.float32
    assert [m.shape[1] for m in maps] == list(encoder.feature_channels)
    assert [SIZE // m.shape[-1] for m in maps] == list(encoder.feature_strides)


def test_data_helpers_on_the_device_of_the_images(device):
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    concepts = torch.randint(0, 4, (2, 4, 8, 8), generator=torch.Generator().manual_seed(1)).to(device)
    with stray_tensor_guard():
        x = data.normalize(images)
        back = data.denormalize(x)
        held = data.NormalizedImages(images, data.SHAPES_MEAN, data.SHAPES_STD)[1:3]
        tiles, sources = data.mosaic(images, k=2, num=2, generator=torch.Generator().manual_seed(0), out_size=12)
        masks = data.concept_masks(concepts)
    assert _on(device, x, back, held, tiles, masks)
    assert_close(back, images)
    assert tiles.shape == (2, 3, 12, 12) and masks.shape == (2, 18, 8, 8) and masks.dtype == torch.bool
    assert sources.device.type == "cpu" and sources.shape == (2, 2, 2)  # documented: on the CPU
