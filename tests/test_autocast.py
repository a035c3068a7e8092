"""Every training loop and every path that may run under autocast is dtype-safe under bf16 autocast.

On a GPU the library's loops run under bf16 autocast (:func:`nemu_lib.config.autocast`); on a CPU that
function returns a null context, so an outer ``torch.autocast("cpu", dtype=torch.bfloat16)`` stays in force and
these tests meet on a CPU the dtype errors a GPU would raise (a bf16 result written into a float32 tensor).
Loops are also checked to have really computed in bf16 (a forward hook records a convolution's output dtype),
so that a test cannot pass because autocast was switched off inside, to give finite losses and to change the
parameters. Results the library documents in full precision (maps, curves, IoU, scores) must stay so.
"""

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from nemu_lib import augment, evaluation, metrics, ssl
from nemu_lib.baselines import label_free_gradient, label_free_integrated_gradients
from nemu_lib.checkpoint import finished, load_checkpoint, save_checkpoint
from nemu_lib.data import ShapesScenes, concept_masks, normalize
from nemu_lib.dissection import dissect
from nemu_lib.encoders import SmallResNet
from nemu_lib.nem import NEMU, OBJECTIVES, build_objective
from nemu_lib.relax import relax
from nemu_lib.train import CHECKPOINT, TrainConfig, load_nemu, train

SIZE = 32


def bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@contextlib.contextmanager
def output_dtypes(module: nn.Module) -> Iterator[list[torch.dtype]]:
    """Record the dtype of every output of ``module`` while the block runs.

    The tests ask for *every* call to have been bf16 (``set(seen) == {torch.bfloat16}``), not just one: a loop
    that switched autocast off for its steps but not for its preparation or validation must fail.
    """
    seen: list[torch.dtype] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        yield seen
    finally:
        handle.remove()


def _encoder(seed: int = 0) -> SmallResNet:
    torch.manual_seed(seed)
    return SmallResNet((4, 8, 8, 8)).eval()


def _images(n: int = 2, seed: int = 1, unit: bool = False) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) if unit else torch.randn(n, 3, SIZE, SIZE, generator=g)


def _changed(before: dict[str, Tensor], module: nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ SimCLR

def test_simclr_augment_with_blur_under_autocast_is_the_full_precision_augment():
    """Augmentation is data preparation: under autocast it must give the float32 views it gives without.
    (Failed with "Index put requires the source and destination dtypes match" when the blur's bf16
    convolution was written into the float32 batch.)"""
    aug = augment.SimCLRAugment(SIZE, (0.45,) * 3, (0.2,) * 3, p_blur=1.0)
    images = _images(6, unit=True)
    torch.manual_seed(0)
    plain = aug(images)
    torch.manual_seed(0)
    with bf16():
        views = aug(images)
    assert views.dtype == torch.float32 and views.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(views, plain)


@pytest.mark.parametrize("kind", ["simclr", "supervised"])
def test_encoder_training_under_autocast(kind):
    encoder, images = _encoder(), _images(16, unit=True)
    before = _snapshot(encoder)
    with bf16(), output_dtypes(encoder.stem[0]) as seen:
        if kind == "simclr":
            history = ssl.train_simclr(encoder, images, epochs=1, batch_size=8, progress=False)
        else:
            labels = torch.arange(16) % 3
            history = ssl.train_supervised(encoder, images, labels, epochs=1, batch_size=8, progress=False)
    assert set(seen) == {torch.bfloat16}, "the encoder's convolutions did not run under bf16 autocast"
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    assert "stem.0.weight" in _changed(before, encoder)
    assert all(v.dtype == before[k].dtype for k, v in encoder.state_dict().items())  # weights stay float32


def test_fit_under_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    x, y = _images(8), torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    before = _snapshot(model)
    with bf16(), output_dtypes(model[0]) as seen:
        history = ssl.fit(model, lambda idx: nn.functional.mse_loss(model(x[idx]).float(), y[idx]), 8, epochs=2,
                          batch_size=4, lr=1e-2, progress=False)
    assert set(seen) == {torch.bfloat16}
    assert len(history) == 4 and all(math.isfinite(v) for v in history)
    assert set(_changed(before, model)) == set(before)  # every weight and bias moved


def test_fit_stop_at_retraces_under_autocast():
    """Notebook 01's retrace (the first steps of a run, stop_at) under bf16: the same losses as the whole run's."""
    x, y = _images(8), torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    histories = []
    for stop_at in (None, 3):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
        with bf16(), output_dtypes(model[0]) as seen:
            histories.append(ssl.fit(model, lambda idx, m=model: nn.functional.mse_loss(m(x[idx]).float(), y[idx]),
                                     8, epochs=3, batch_size=4, lr=1e-2, progress=False, stop_at=stop_at))
        assert set(seen) == {torch.bfloat16}
    assert len(histories[0]) == 6 and histories[1] == histories[0][:3]


# ------------------------------------------------------------------------------------------------- NEM-U

@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nemu_training_under_autocast(tmp_path, objective):
    encoder = _encoder()
    torch.manual_seed(1)
    model = NEMU(encoder, uncertainty=objective == "relax")
    cfg = TrainConfig(objective=objective, steps=2, batch_size=4, lr=1e-2, relax_masks=2)
    enc_before, dec_before = _snapshot(encoder), _snapshot(model.decoder)
    with bf16(), output_dtypes(model.decoder.head) as seen:
        history = train(model, _images(8), _images(4, seed=2), cfg, tmp_path, val_every=2, progress=False)
    assert set(seen) == {torch.bfloat16}, "the decoder did not run under bf16 autocast"
    assert all(math.isfinite(v) for k in ("loss", "val_loss") for v in history[k]) and len(history["loss"]) == 2
    assert set(_changed(dec_before, model.decoder)) == set(dec_before)
    assert not _changed(enc_before, encoder)  # the encoder is frozen, its BatchNorm statistics too
    assert all(p.dtype == torch.float32 for p in model.decoder.parameters())
    loaded = load_nemu(tmp_path / CHECKPOINT, encoder)
    assert_close(loaded.decoder.state_dict(), model.decoder.state_dict(), atol=0, rtol=0)
    # the finished run as it ships (no optimiser state) loads under autocast too, training nothing more
    save_checkpoint(finished(load_checkpoint(tmp_path / CHECKPOINT)), tmp_path / CHECKPOINT)
    torch.manual_seed(1)
    again = NEMU(encoder, uncertainty=objective == "relax")
    with bf16():
        resumed = train(again, _images(8), _images(4, seed=2), cfg, tmp_path, val_every=2, resume=True, progress=False)
    assert resumed == history
    assert_close(again.decoder.state_dict(), model.decoder.state_dict(), atol=0, rtol=0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_forward_backward_under_autocast(objective):
    torch.manual_seed(1)
    model = NEMU(_encoder(), uncertainty=objective == "relax").train()
    obj = build_objective(objective, **({"n_masks": 3} if objective == "relax" else {}))
    x = _images(3)
    with bf16(), output_dtypes(model.decoder.head) as seen:
        z, m = model(x)
        loss, stats = obj(model, x, torch.Generator().manual_seed(1))
        loss.backward()
    assert set(seen) == {torch.bfloat16}
    assert z.shape == (3, 8) and m.shape == (3, 1, SIZE, SIZE) and ((m >= 0) & (m <= 1)).all()
    assert math.isfinite(loss.item()) and all(math.isfinite(s.item()) for s in stats.values())
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert model.decoder.head.weight.grad.abs().sum() > 0
    assert torch.isfinite(model.decoder.head.bias).all() and model.decoder.head.bias.dtype == torch.float32


# ---------------------------------------------------------------------------------- explanations, metrics

def test_relax_under_autocast_returns_float64_maps():
    encoder, x = _encoder(), _images()
    with bf16(), output_dtypes(encoder.stem[0]) as seen:
        r = relax(encoder, x, n_masks=20, batch_size=10)
    assert set(seen) == {torch.bfloat16}
    for t in (r.importance, r.uncertainty, r.u_relax, r.weights):
        assert t.dtype == torch.float64 and torch.isfinite(t).all()
    assert r.importance.shape == (2, SIZE, SIZE) and r.u_relax_mask.dtype == torch.bool


def test_gradient_maps_under_autocast_keep_the_images_dtype():
    encoder, x = _encoder(), _images()
    with bf16():
        maps = [label_free_gradient(encoder, x), *label_free_integrated_gradients(encoder, x, steps=2,
                                                                                  return_gap=True)]
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps)


def test_deletion_insertion_under_autocast_returns_float64_curves():
    encoder, x = _encoder(), _images()
    a = torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with bf16(), output_dtypes(encoder.stem[0]) as seen:
        c = metrics.deletion_insertion(encoder, x, a, steps=4)
    assert set(seen) == {torch.bfloat16}
    for t in (c.fractions, c.deletion, c.insertion, c.deletion_auc, c.insertion_auc):
        assert t.dtype == torch.float64 and torch.isfinite(t).all()
    assert_close(c.deletion[:, 0], torch.ones(2, dtype=torch.float64), atol=1e-2, rtol=0)  # bf16: ~3 digits
    assert_close(c.insertion[:, -1], torch.ones(2, dtype=torch.float64), atol=1e-2, rtol=0)


def test_dissect_under_autocast_returns_float64_iou():
    s = ShapesScenes("val", size=6, image_size=SIZE).stack(progress=False)
    encoder = _encoder()
    with bf16(), output_dtypes(encoder.stem[0]) as seen:
        out = dissect(encoder, normalize(s["image"]), concept_masks(s["concepts"]), layers=["stage1", "stage4"],
                      batch_size=4, progress=False)
    assert set(seen) == {torch.bfloat16}
    for r in out.values():
        assert r.iou.dtype == torch.float64 and r.thresholds.dtype == torch.float32
        assert ((r.iou >= 0) & (r.iou <= 1)).all() and torch.isfinite(r.thresholds).all()


def test_explain_all_and_score_maps_under_autocast():
    encoder, x = _encoder(), _images()
    gt = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    gt[:, 4:12, 6:14] = True
    torch.manual_seed(1)
    decoders = {"nem": NEMU(encoder), "relax": NEMU(encoder, uncertainty=True)}
    with bf16(), output_dtypes(encoder.stem[0]) as seen:
        maps, _ = evaluation.explain_all(encoder, decoders, x, n_masks=8, ig_steps=2, progress=False)
        scores = evaluation.score_maps(encoder, x, gt, maps, reference=maps["RELAX"], steps=4, progress=False)
    assert set(seen) == {torch.bfloat16}
    assert all(m.dtype == torch.float32 and torch.isfinite(m).all() for m in maps.values())
    for name, per_metric in scores.items():
        assert set(per_metric) == set(evaluation.METRICS), name
        assert all(v.dtype == torch.float64 and v.shape == (2,) for v in per_metric.values()), name
        assert all(torch.isfinite(per_metric[k]).all() for k in ("deletion_auc", "insertion_auc")), name


@pytest.mark.parametrize("amp", [True, False])
def test_an_outer_autocast_stays_in_force_whatever_amp_says(tmp_path, amp):
    """On a CPU, ``amp`` neither switches autocast on nor off: the outer context decides (``config.autocast``)."""
    torch.manual_seed(1)
    model = NEMU(_encoder())
    cfg = dataclasses.replace(TrainConfig(steps=1, batch_size=4), amp=amp)
    with output_dtypes(model.decoder.head) as plain:
        train(model, _images(4), None, cfg, tmp_path / "plain", progress=False)
    with bf16(), output_dtypes(model.decoder.head) as outer:
        train(model, _images(4), None, cfg, tmp_path / "outer", progress=False)
    assert set(plain) == {torch.float32} and set(outer) == {torch.bfloat16}


def _vit():
    from nemu_lib.vit import vit_tiny

    torch.manual_seed(0)
    return vit_tiny(image_size=32, patch_size=8, layers=2, hidden=32, heads=2, mlp=64).eval()


def _wrapped():
    from nemu_lib.encoders import Encoder

    return Encoder.wrap(_encoder(), probe_size=32).eval()


@pytest.mark.parametrize("factory", [_vit, _wrapped], ids=["vit", "wrapped"])
def test_new_encoders_train_under_autocast(tmp_path, factory):
    """notebook 07's two training steps on a ViT and a wrapped CNN: the supervised fit and NEM-U's decoder."""
    encoder = factory()
    with bf16():
        history = ssl.train_supervised(encoder, _images(16, unit=True), torch.arange(16) % 3, epochs=1, batch_size=8,
                                       progress=False)
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    encoder.eval()
    model = NEMU(encoder)
    dec_before = _snapshot(model.decoder)
    cfg = TrainConfig(objective="nem", steps=2, batch_size=4, lr=1e-2)
    with bf16(), output_dtypes(model.decoder.head) as seen:
        nemu_history = train(model, _images(8), None, cfg, tmp_path, progress=False)
    assert set(seen) == {torch.bfloat16} and all(math.isfinite(v) for v in nemu_history["loss"])
    assert set(_changed(dec_before, model.decoder)) == set(dec_before)
