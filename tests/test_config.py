"""nemu_lib.config: profiles, seeding and the data/outputs folders."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from nemu_lib import config
from nemu_lib.config import PROFILES, Profile, data_dir, default_profile_name, get_profile, outputs_dir


def test_profiles_by_name():
    assert set(PROFILES) == {"smoke", "cpu", "gpu", "full"}
    for name, profile in PROFILES.items():
        assert get_profile(name) is profile
        assert profile.name == name
        assert 32 <= profile.image_size <= 128
        assert len(profile.encoder_widths) == 4
    smoke, cpu = get_profile("smoke"), get_profile("cpu")
    assert smoke.image_size == 32
    assert smoke.n_train < cpu.n_train < get_profile("gpu").n_train < get_profile("full").n_train


def test_profile_instance_passes_through():
    custom = dataclasses.replace(PROFILES["smoke"], name="mine", image_size=48)
    assert get_profile(custom) is custom


def test_profiles_are_frozen_and_as_dict():
    profile = get_profile("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.image_size = 99
    d = profile.as_dict()
    assert d["name"] == "smoke" and d["image_size"] == 32
    assert set(d) == {f.name for f in dataclasses.fields(Profile)}


@pytest.mark.parametrize("name", ["smoke", "cpu", "gpu", "full"])
def test_profile_from_env(monkeypatch, name):
    monkeypatch.setenv("NEMU_PROFILE", name)
    assert default_profile_name() == name
    assert get_profile() is PROFILES[name]
    assert get_profile(None).name == name


def test_argument_beats_env(monkeypatch):
    monkeypatch.setenv("NEMU_PROFILE", "gpu")
    assert get_profile("smoke").name == "smoke"


@pytest.mark.parametrize("name", ["tiny", "SMOKE", ""])
def test_unknown_profile_names_choices(name):
    with pytest.raises(ValueError) as info:
        get_profile(name)
    message = str(info.value)
    assert repr(name) in message
    for choice in ("smoke", "cpu", "gpu", "full"):
        assert choice in message
    assert "NEMU_PROFILE" in message


def test_unknown_profile_from_env(monkeypatch):
    monkeypatch.setenv("NEMU_PROFILE", "laptop")
    with pytest.raises(ValueError, match="laptop"):
        get_profile()


@pytest.mark.parametrize("cuda, expected", [(True, "gpu"), (False, "cpu")])
def test_default_profile_follows_cuda(monkeypatch, cuda, expected):
    monkeypatch.delenv("NEMU_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert default_profile_name() == expected
    assert get_profile().name == expected


def test_empty_env_falls_back_to_default(monkeypatch):
    monkeypatch.setenv("NEMU_PROFILE", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_profile_name() == "cpu"


def test_device(monkeypatch):
    assert config.device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert config.device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.device() == torch.device("cuda")


def _draws():
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),  # noqa: NPY002 (the global state is what seed_everything sets)
        torch.randn(3).tolist(),
    )


def test_seed_everything_reproducible():
    gen_a = config.seed_everything(123)
    first = _draws()
    from_gen_a = torch.randn(4, generator=gen_a)
    gen_b = config.seed_everything(123)
    second = _draws()
    from_gen_b = torch.randn(4, generator=gen_b)
    assert first == second
    assert torch.equal(from_gen_a, from_gen_b)
    assert isinstance(gen_a, torch.Generator)
    # the returned generator is seeded like the global one
    assert torch.equal(from_gen_a, torch.randn(4, generator=torch.Generator().manual_seed(123)))


def test_seed_everything_different_seeds_differ():
    config.seed_everything(1)
    a = _draws()
    config.seed_everything(2)
    b = _draws()
    for x, y in zip(a, b, strict=True):
        assert x != y


def test_seed_everything_large_seed():
    """Seeds beyond NumPy's 32-bit range still work (NumPy gets seed mod 2**32)."""
    config.seed_everything(2**40 + 5)
    a = np.random.rand(2)  # noqa: NPY002
    np.random.seed(5)  # noqa: NPY002
    assert np.array_equal(a, np.random.rand(2))  # noqa: NPY002


@pytest.mark.parametrize("env, fn", [("NEMU_DATA", data_dir), ("NEMU_OUTPUTS", outputs_dir)])
def test_dirs_honour_env(monkeypatch, tmp_path, env, fn):
    target = tmp_path / "nested" / env.lower()
    monkeypatch.setenv(env, str(target))
    assert not target.exists()
    assert fn() == target
    assert target.is_dir()  # created on demand


DIRS = [("NEMU_DATA", data_dir, "data"), ("NEMU_OUTPUTS", outputs_dir, "outputs")]


@pytest.mark.parametrize("env, fn, default", DIRS)
def test_dirs_default_to_checkout(monkeypatch, tmp_path, env, fn, default):
    """In a checkout (pyproject.toml beside nemu_lib) the folders sit in the checkout."""
    monkeypatch.delenv(env, raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path)  # never touch the real repo folders
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert fn() == tmp_path / default
    assert (tmp_path / default).is_dir()
    assert not (elsewhere / default).exists()


@pytest.mark.parametrize("env, fn, default", DIRS)
def test_dirs_default_to_cwd_when_installed(monkeypatch, tmp_path, env, fn, default):
    """An installed package (site-packages, no pyproject.toml) uses the working directory."""
    monkeypatch.delenv(env, raising=False)
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.setattr(config, "REPO_ROOT", site)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert fn() == work / default
    assert (work / default).is_dir()
    assert not (site / default).exists()


def test_repo_root_is_the_checkout():
    assert (config.REPO_ROOT / "nemu_lib" / "config.py").is_file()
    assert config.project_root() == config.REPO_ROOT  # this checkout has its pyproject.toml


# ------------------------------------------------------------------------------------ mixed precision

def test_amp_dtype_by_device(monkeypatch):
    assert config.amp_dtype("cpu") is None
    for capability, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert config.amp_dtype("cuda") == dtype  # T4: fp16; Ampere and later: bf16


def test_autocast_keeps_an_outer_autocast_off_cuda():
    with torch.autocast("cpu", dtype=torch.bfloat16), config.autocast("cpu"):
        assert torch.is_autocast_enabled("cpu")
    with config.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert not config.grad_scaler("cpu").is_enabled()


def test_exact_float32_turns_tf32_off_and_restores():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with config.exact_float32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
