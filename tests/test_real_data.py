"""nemu_lib.real_data.load_real_dataset offline: a clear DatasetUnavailableError, never a network call."""

import socket

import pytest

from nemu_lib import real_data
from nemu_lib.real_data import DatasetUnavailableError, load_real_dataset

NAMES = ["stl10", "imagenette", "voc"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs offline: _online says no, and any socket connection fails loudly."""
    calls = []

    def offline(host, *args, **kwargs):
        calls.append(host)
        return False

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(real_data, "_online", offline)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


def test_unknown_name():
    with pytest.raises(ValueError) as info:
        load_real_dataset("cifar10")
    message = str(info.value)
    assert "'cifar10'" in message
    for name in NAMES:
        assert name in message
    assert "ShapesScenes" in message


@pytest.mark.parametrize("name", NAMES)
def test_offline_raises_clear_error(tmp_path, no_network, name):
    root = tmp_path / "my_data"
    with pytest.raises(DatasetUnavailableError) as info:
        load_real_dataset(name, root=root)
    message = str(info.value)
    assert str(root) in message
    assert "internet" in message
    assert "offline" in message
    assert "ShapesScenes" in message
    assert name in message
    assert no_network == [real_data._REAL[name][0]]  # asked about the right host, once


@pytest.mark.parametrize("name", NAMES)
def test_download_false_raises_without_checking_network(tmp_path, no_network, name):
    with pytest.raises(DatasetUnavailableError) as info:
        load_real_dataset(name, root=tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "download=False" in message
    assert "internet" in message and "ShapesScenes" in message
    assert no_network == []  # download=False never probes the network


def test_default_root_is_under_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMU_DATA", str(tmp_path))
    with pytest.raises(DatasetUnavailableError) as info:
        load_real_dataset("imagenette", split="val")
    message = str(info.value)
    assert str(tmp_path / "imagenette") in message
    assert "(val)" in message


def test_error_is_a_runtime_error():
    assert issubclass(DatasetUnavailableError, RuntimeError)
