"""Progress bars (nemu_lib.progress): under NEMU_PROGRESS=final one line per bar when it closes, nothing while it
runs; otherwise tqdm.auto."""

from __future__ import annotations

from tqdm.auto import tqdm as auto_tqdm

from nemu_lib import progress


def test_final_line_bar_prints_one_line_when_it_closes(capsys, monkeypatch):
    monkeypatch.setenv("NEMU_PROGRESS", "final")
    bar = progress.tqdm(total=5, desc="RELAX")
    assert isinstance(bar, progress.FinalLineBar)
    for _ in range(5):
        bar.update()
        assert capsys.readouterr().out == ""  # nothing while it runs
    bar.close()
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and out.out.startswith("RELAX: 100%") and "5/5" in out.out, out.out
    assert out.err == ""


def test_final_line_bar_as_an_iterator_and_quiet_cases(capsys, monkeypatch):
    monkeypatch.setenv("NEMU_PROGRESS", "final")
    assert sum(progress.tqdm(range(4), desc="sum")) == 6
    assert capsys.readouterr().out.startswith("sum: 100%")
    list(progress.tqdm(range(3), leave=False))  # an inner bar leaves nothing
    list(progress.tqdm(range(3), disable=True))
    assert capsys.readouterr().out == ""


def test_default_is_tqdm_auto(monkeypatch):
    monkeypatch.delenv("NEMU_PROGRESS", raising=False)
    bar = progress.tqdm(total=1, disable=True)
    assert type(bar) is auto_tqdm and not progress.final_line()
