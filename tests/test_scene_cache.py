"""nemu_lib.scene_cache: Shapes splits rendered once and kept on disk, identical to a fresh render."""

import pytest
import torch

from nemu_lib import data, scene_cache
from nemu_lib.data import ShapesScenes
from nemu_lib.scene_cache import cache_path, cached_split, load_split_file, render_split

SPLIT = ("val", 24, 32, 5)  # split, size, image_size, seed: a few tens of milliseconds to render


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """A temporary NEMU_OUTPUTS with the disk cache switched on."""
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    monkeypatch.delenv("NEMU_SCENE_CACHE", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def fresh():
    """The reference: ``ShapesScenes(...).stack()`` as ``load_split`` returned it before the cache."""
    split, size, image_size, seed = SPLIT
    return ShapesScenes(split, size, image_size, seed).stack(progress=False)


def _assert_identical(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _cached():
    return cached_split(*SPLIT, progress=False)


def _forbid_rendering(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rendered although the split is on disk")

    monkeypatch.setattr(scene_cache, "render_split", fail)
    monkeypatch.setattr(scene_cache, "_render_chunk", fail)


def test_render_split_equals_stack(fresh):
    _assert_identical(render_split(*SPLIT, num_workers=0, progress=False), fresh)


def test_workers_equal_one_process(fresh):
    _assert_identical(render_split(*SPLIT, num_workers=2, progress=False), fresh)
    _assert_identical(render_split(*SPLIT, num_workers=3, progress=False), fresh)  # uneven chunks


def test_cached_equals_fresh_and_second_load_reads_the_file(outputs, fresh, monkeypatch):
    first = _cached()  # renders and writes
    _assert_identical(first, fresh)
    path = cache_path(*SPLIT)
    assert path.parent == outputs / "cache" / "shapes"
    assert path.is_file()
    _forbid_rendering(monkeypatch)
    _assert_identical(_cached(), fresh)  # read back from disk


def test_file_name_holds_every_key_part(outputs):
    name = cache_path("test", 123, 48, 9).name
    assert name == f"shapes-test-n123-48px-seed9-gen{data.GENERATOR_VERSION}.pt"


def test_file_loads_with_weights_only(outputs, monkeypatch):
    _cached()
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _cached()
    assert calls == [True]


def test_storage_is_compact(outputs, fresh):
    """Masks bit-packed, integer fields narrowed, images float32 (they are not multiples of 1/255)."""
    _cached()
    fields = torch.load(cache_path(*SPLIT), weights_only=True)["fields"]
    for k in ("object_mask", "instance_masks", "keypoint_valid"):
        assert fields[k]["bits"].dtype == torch.uint8
        assert fields[k]["bits"].numel() == -(-fresh[k].numel() // 8)
    for k in ("concepts", "label", "num_objects"):
        assert fields[k]["data"].dtype == torch.uint8
    assert fields["index"]["data"].dtype == torch.int32  # val indices start at 10,000,000
    assert fields["image"]["data"].dtype == torch.float32
    assert not torch.equal(fresh["image"], (fresh["image"] * 255).round() / 255)  # uint8 would not round-trip
    raw = sum(t.numel() * t.element_size() for t in fresh.values())
    assert cache_path(*SPLIT).stat().st_size < 0.9 * raw


def test_new_generator_version_renders_again_and_replaces_the_file(outputs, fresh, monkeypatch):
    _cached()
    old = cache_path(*SPLIT)
    monkeypatch.setattr(data, "GENERATOR_VERSION", data.GENERATOR_VERSION + 1)
    calls = []
    real_render = scene_cache.render_split

    def counting(*args, **kwargs):
        calls.append(args)
        return real_render(*args, **kwargs)

    monkeypatch.setattr(scene_cache, "render_split", counting)
    _assert_identical(_cached(), fresh)
    assert len(calls) == 1
    new = cache_path(*SPLIT)
    assert new != old and new.is_file() and not old.exists()
    assert sorted(p.name for p in new.parent.iterdir()) == [new.name]
    other = cached_split("val", 8, 32, 5, progress=False)  # another split's file is left alone
    assert len(other["image"]) == 8
    _assert_identical(_cached(), fresh)
    assert len(calls) == 2  # only the new split rendered
    assert len(list(new.parent.iterdir())) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "another_split"])
def test_unreadable_file_is_rendered_again(outputs, fresh, damage):
    path = cache_path(*SPLIT)
    path.parent.mkdir(parents=True)
    if damage == "garbage":
        path.write_bytes(b"not a torch file\n" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        _cached()
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:  # a valid file under the wrong name: its stored key does not match
            cached_split("val", 24, 32, 6, progress=False)
            cache_path("val", 24, 32, 6).replace(path)
    with pytest.warns(RuntimeWarning, match="unreadable") as record:
        _assert_identical(_cached(), fresh)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    _assert_identical(load_split_file(path), fresh)  # replaced by a good file


def test_switched_off_writes_nothing(outputs, fresh, monkeypatch):
    monkeypatch.setenv("NEMU_SCENE_CACHE", "0")
    _assert_identical(_cached(), fresh)
    assert not (outputs / "cache").exists()


def test_unwritable_folder_warns_and_returns_the_split(outputs, fresh, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.warns(RuntimeWarning, match="could not write"):
        got = cached_split(*SPLIT, progress=False, directory=blocker / "cache")
    _assert_identical(got, fresh)


def test_load_split_goes_through_the_disk_cache(outputs, monkeypatch):
    data._rendered.cache_clear()  # the in-process cache may hold the split from another test
    try:
        split = data.load_split("val", "smoke")
        p = data.get_profile("smoke")
        path = cache_path("val", p.n_val, p.image_size, 0)
        assert path.is_file()
        data._rendered.cache_clear()
        _forbid_rendering(monkeypatch)
        _assert_identical(data.load_split("val", "smoke"), split)
        assert data.load_split("val", "smoke") is data.load_split("val", "smoke")  # in-process cache on top
    finally:
        data._rendered.cache_clear()  # nothing from this temporary folder outlives the test


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([0, 255, 3], dtype=torch.int64),
        torch.tensor([-1, 100], dtype=torch.int64),
        torch.tensor([70_000, -5], dtype=torch.int64),
        torch.tensor([2**40], dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        torch.tensor([[True, False, True]] * 3),  # 9 bits: not a multiple of 8
        torch.rand(2, 3, dtype=torch.float64),
        torch.tensor([1, 7], dtype=torch.uint8),
    ],
)
def test_encoding_round_trips(t):
    back = scene_cache._decode(scene_cache._encode(t))
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_default_workers(monkeypatch):
    monkeypatch.setattr(scene_cache, "_cpus", lambda: 16)
    assert scene_cache.default_workers(scene_cache.PARALLEL_MIN_SCENES - 1) == 0
    assert scene_cache.default_workers(50_000) == scene_cache.MAX_AUTO_WORKERS
    monkeypatch.setattr(scene_cache, "_cpus", lambda: 1)
    assert scene_cache.default_workers(50_000) == 0


def test_bad_arguments_raise_before_touching_the_disk(outputs):
    with pytest.raises(ValueError, match="unknown split"):
        cached_split("training", 10, 32, 0, progress=False)
    assert not (outputs / "cache").exists()


def test_decoding_refuses_short_bit_arrays():
    entry = scene_cache._encode(torch.ones(20, dtype=torch.bool))
    entry["bits"] = entry["bits"][:2]  # 16 bits for 20 values
    with pytest.raises(ValueError, match="packed bytes"):
        scene_cache._decode(entry)
