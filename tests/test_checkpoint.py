"""nemu_lib.checkpoint: atomic writes, weights-only loads, config checks."""

import os
import pickle

import pytest
import torch

from nemu_lib import checkpoint
from nemu_lib.checkpoint import load_checkpoint, save_checkpoint

CALLS = []


def _side_effect():
    CALLS.append("ran")
    return "pwned"


class Sneaky:
    """Pickles to a call of _side_effect: loading it with full pickle would run code."""

    def __reduce__(self):
        return (_side_effect, ())


def _ckpt():
    return {
        "config": {"name": "small_resnet", "widths": (8, 16, 32, 64), "image_size": 32},
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)},
        "epoch": 3,
        "history": [0.5, 0.25],
    }


def test_round_trip(tmp_path):
    obj = _ckpt()
    path = save_checkpoint(obj, tmp_path / "a" / "b" / "model.pt")  # parents created
    assert path == tmp_path / "a" / "b" / "model.pt"
    assert path.is_file()
    loaded = load_checkpoint(path)
    assert loaded["config"] == obj["config"]
    assert loaded["config"]["widths"] == (8, 16, 32, 64)  # tuples survive
    assert loaded["epoch"] == 3 and loaded["history"] == [0.5, 0.25]
    for k, v in obj["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v)
        assert loaded["state_dict"][k].dtype == v.dtype
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp file left


def test_save_accepts_str_path_and_overwrites(tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint({"config": {"v": 1}}, path)
    save_checkpoint({"config": {"v": 2}}, path)
    assert load_checkpoint(path)["config"] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / "model.pt"
    save_checkpoint(_ckpt(), path)
    old_bytes = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")  # partial write, then the failure
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        save_checkpoint({"config": {"name": "other"}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # temp file removed
    assert load_checkpoint(path)["config"]["name"] == "small_resnet"


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        f.write(b"xx")
        raise RuntimeError("boom")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"config": {}}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_saved_file_has_normal_permissions(tmp_path):
    """The checkpoint is readable like any file the user writes (umask), not private like a temp file."""
    umask = os.umask(0)
    os.umask(umask)
    path = save_checkpoint({"config": {}}, tmp_path / "m.pt")
    torch.save({}, tmp_path / "plain.pt")
    assert oct((tmp_path / "plain.pt").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~umask)


def test_weights_only_refuses_pickled_objects(tmp_path):
    path = save_checkpoint({"config": {}, "evil": Sneaky()}, tmp_path / "evil.pt")
    CALLS.clear()
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)
    assert CALLS == []  # the pickled call never ran
    # sanity: a full unpickle would have run it
    torch.load(path, weights_only=False)
    assert CALLS == ["ran"]


def test_expect_match_passes(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "m.pt")
    ckpt = load_checkpoint(path, expect={"name": "small_resnet", "image_size": 32})
    assert ckpt["epoch"] == 3


def test_expect_mismatch_names_keys(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "m.pt")
    with pytest.raises(ValueError) as info:
        load_checkpoint(path, expect={"name": "small_resnet", "image_size": 64, "widths": [8, 16, 32, 128]})
    message = str(info.value)
    assert "image_size: 32 -> 64" in message  # the checkpoint's value, then the expected one
    assert "widths" in message and "128" in message
    assert "name:" not in message  # matching keys are not listed
    assert str(path) in message and "delete the file to retrain" in message
    assert isinstance(info.value, checkpoint.CheckpointMismatch) and info.value.path == path


def test_expect_missing_key_is_a_mismatch(tmp_path):
    path = save_checkpoint(_ckpt(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"blocks: None -> \[1, 1, 1, 1\]"):
        load_checkpoint(path, expect={"blocks": [1, 1, 1, 1]})


def test_expect_mismatch_lists_only_the_differing_nested_settings(tmp_path):
    """A retrain message names e.g. ``training.epochs: 12 -> 20``, not two whole config dicts."""
    training = {"epochs": 12, "lr": 0.002, "temperature": 0.2, "mean": (0.4, 0.5)}
    path = save_checkpoint({"config": {"training": training}}, tmp_path / "m.pt")
    with pytest.raises(checkpoint.CheckpointMismatch) as info:
        load_checkpoint(path, expect={"training": {**training, "epochs": 20, "temperature": 0.1, "extra": 1}})
    assert info.value.changes == ["training.epochs: 12 -> 20", "training.temperature: 0.2 -> 0.1",
                                  "training.extra: None -> 1"]


@pytest.mark.parametrize("stored, expected", [((8, 16), [8, 16]), ([8, 16], (8, 16)), ((8, 16), (8, 16))])
def test_tuples_and_lists_compare_equal(tmp_path, stored, expected):
    path = save_checkpoint({"config": {"widths": stored}}, tmp_path / "m.pt")
    assert load_checkpoint(path, expect={"widths": expected})["config"]["widths"] == stored


def test_tuple_list_different_values_still_differ(tmp_path):
    path = save_checkpoint({"config": {"widths": (8, 16)}}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="widths"):
        load_checkpoint(path, expect={"widths": [8, 16, 32]})


def test_normalise():
    assert checkpoint._normalise((1, 2)) == [1, 2]
    assert checkpoint._normalise("ab") == "ab"
    assert checkpoint._normalise(None) is None


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


def test_not_a_nemu_checkpoint(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="no 'config' entry"):
        load_checkpoint(path)
    torch.save(torch.zeros(2), path)
    with pytest.raises(ValueError, match="not a nemu checkpoint"):
        load_checkpoint(path)


def test_map_location(tmp_path):
    path = save_checkpoint({"config": {}, "t": torch.ones(2)}, tmp_path / "m.pt")
    assert load_checkpoint(path, map_location="cpu")["t"].device == torch.device("cpu")


def test_a_finished_run_needs_no_optimiser_state_an_unfinished_one_does(tmp_path):
    from nemu_lib.checkpoint import finished, restore_optimizer

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    ckpt = {"config": {"train": {"steps": 10}}, "optimizer": opt.state_dict(), "step": 10}
    assert "optimizer" not in finished(ckpt) and finished(ckpt)["step"] == 10
    assert finished({**ckpt, "step": 4}) == {**ckpt, "step": 4}  # interrupted: kept whole
    assert finished({"config": {}, "state": 1}) == {"config": {}, "state": 1}  # not a training checkpoint
    fresh = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters())
    restore_optimizer(finished(ckpt), fresh, 10, tmp_path / "c.pt")  # nothing left to train: no state needed
    assert not fresh.state
    restore_optimizer(ckpt, fresh, 10, tmp_path / "c.pt")
    assert fresh.state  # the moments came back
    with pytest.raises(ValueError, match="cannot go on from step 4 of 10"):
        restore_optimizer({"step": 4}, fresh, 10, tmp_path / "c.pt")
