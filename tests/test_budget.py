"""nemu_lib.budget: FLOP counts with known answers, estimates against measured wall times, the profiles' budgets."""

import math

import pytest
import torch
from torch import nn

from nemu_lib import budget
from nemu_lib.budget import SPEEDS, announce, estimate_seconds, forward_gflops, notebook_seconds

# Wall times of each notebook's first run in the cpu profile on an idle 2-core CPU (budget.MEASURED), minutes.
MEASURED_CPU_MINUTES = {"00_setup_and_data": 0.7, "01_self_supervised_encoders": 6.3, "02_relax": 1.4,
                        "03_nemu": 5.3, "04_evaluating_explanations": 7.9, "05_network_dissection": 0.8,
                        "06_explainer_networks": 2.0, "07_your_own_encoder": 5.1}


def test_forward_gflops_of_a_convolution_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # 2 FLOPs (multiply, add) x 8 outputs x 8 x 8 positions x 3 x 3 x 3 weights
    assert forward_gflops(conv, torch.zeros(5, 3, 8, 8)) == 2 * 8 * 8 * 8 * 27 / 1e9
    assert forward_gflops(conv, torch.zeros(1, 3, 16, 16)) == 4 * 2 * 8 * 8 * 8 * 27 / 1e9  # per shape


def test_forward_gflops_never_stops_the_work():
    class Constant(nn.Module):  # returns a parameter untouched: no FLOPs
        def __init__(self):
            super().__init__()
            self.z = nn.Parameter(torch.ones(1, 4))

        def forward(self, x):
            return self.z

    class Untraceable(nn.Module):  # fails on the counter's one-image batch
        def forward(self, x):
            raise RuntimeError("needs a batch of 2")

    assert forward_gflops(Constant(), torch.zeros(1, 3, 8, 8)) == 0
    assert math.isnan(forward_gflops(Untraceable(), torch.zeros(2, 3, 8, 8)))
    assert math.isnan(announce("nothing to estimate", math.nan, infer_images=1e9, device="cpu"))


def test_estimate_is_work_over_throughput_plus_overhead():
    speed = budget.DeviceSpeed("x", train_tflops=2.0, infer_tflops=1.0, overhead=0.5, source="test")
    # 1 GFLOP per image: 1,000 training images = 3 TFLOP at 2 TFLOP/s, 2,000 inferences = 2 TFLOP at 1
    assert estimate_seconds(1.0, train_images=1000, infer_images=2000, calls=4, speed=speed) == 1.5 + 2 + 2


def test_announce_speaks_only_for_long_steps(capsys):
    assert announce("short", 0.001, infer_images=10, device="cpu") < 60
    assert capsys.readouterr().out == ""
    seconds = announce("long", 1.0, infer_images=1e5, device="cpu")
    assert seconds > 60 and capsys.readouterr().out.startswith(f"long: about {budget.format_seconds(seconds)} on ")


def test_format_seconds():
    assert [budget.format_seconds(s) for s in (45, 192, 3 * 3600)] == ["45 s", "3.2 min", "3.0 h"]


def test_cpu_estimates_are_within_2x_of_the_measured_wall_times():
    estimated = notebook_seconds("cpu", SPEEDS["cpu"])
    for name, minutes in MEASURED_CPU_MINUTES.items():
        assert 0.5 < estimated[name] / 60 / minutes < 2, (name, estimated[name] / 60, minutes)


def test_the_gpu_profile_fits_a_free_colab_gpu():
    """Each notebook's first run <= 6 min estimated on a T4 (so <= ~10 min with the estimate 2x off)."""
    estimated = notebook_seconds("gpu", SPEEDS["t4"])
    assert set(estimated) == set(MEASURED_CPU_MINUTES)
    assert max(estimated.values()) <= 6 * 60, {k: round(v / 60, 1) for k, v in estimated.items()}


def test_the_full_profile_matches_the_h100_simclr_measurement():
    """Measured: 100 SimCLR epochs at batch 512 on 50,000 scenes in ~8.5 min on an H100 (19 steps/s)."""
    simclr_only = notebook_seconds("full", SPEEDS["h100"])["01_self_supervised_encoders"]
    assert 8.5 * 60 < simclr_only < 2 * 8.5 * 60


@pytest.mark.parametrize("name, expected", [("NVIDIA H100 80GB HBM3", "h100"), ("Tesla T4", "t4"),
                                            ("NVIDIA A100-SXM4-40GB", "t4")])
def test_device_speed_by_gpu_name(monkeypatch, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert budget.device_speed("cuda") is SPEEDS[expected]
    assert budget.device_speed("cpu") is SPEEDS["cpu"]


def test_expected_time_prints_measured_times_and_estimates_the_rest():
    assert budget.expected_time("03_nemu", "cpu", "cpu") == budget.MEASURED["03_nemu"]["cpu"]
    assert budget.expected_time("03_nemu", "gpu", "cpu").endswith("(estimated by nemu_lib.budget for a first run)")
    assert set(budget.MEASURED) == set(MEASURED_CPU_MINUTES)


def test_counting_changes_no_state():
    """The count runs in eval mode: a model about to be trained keeps its BatchNorm statistics and its mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert forward_gflops(model, torch.rand(2, 3, 8, 8)) > 0
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
