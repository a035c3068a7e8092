"""The figures the notebooks' text quotes come from the run (nemu_lib.prose): known answers on toy notebooks, a
planted wrong number, and the last cpu run's executed notebooks when there are some."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemu_lib import prose
from nemu_lib.config import outputs_dir


def _nb(markdown: str, printed: str = "", code: str = "x = 1") -> dict:
    return {"cells": [
        {"cell_type": "code", "source": code,
         "outputs": [{"output_type": "stream", "name": "stdout", "text": printed}]},
        {"cell_type": "markdown", "source": markdown},
    ]}


def _quoted(markdown: str) -> list[str]:
    return [q.text for q, _ in prose.quotes(markdown)]


def test_which_numbers_count_as_quoted_figures():
    text = ("### 2.1 Training\nSection 4 trains 600 steps at 64 px (2017); r = 0.55, −0.20, 75 %, 5.56x, 1,118× "
            "faster and 12,000 masks. `lr = 0.003` and $\\beta = 0.25$ are code and maths, [a link](fig_0.5.png), "
            "arXiv:2112.10161, Chen et al. § 4.2.")
    assert _quoted(text) == ["0.55", "−0.20", "75 %", "5.56x", "1,118×", "12,000"]


def test_precision_decides_what_matches():
    numbers = sorted([0.5512, 0.213, 74.8, 0.158])
    q = {t.text: t for t, _ in prose.quotes("0.55 0.551 0.552 0.2 −0.21 75 % 16 % 15.8 % 0.16 0.1")}
    assert prose.sourced(q["0.55"], numbers) and prose.sourced(q["0.551"], numbers)
    assert not prose.sourced(q["0.552"], numbers)  # 0.5512 rounds to 0.551
    assert prose.sourced(q["0.2"], numbers) and not prose.sourced(q["−0.21"], numbers)  # the sign counts
    assert prose.sourced(q["75 %"], numbers)  # 74.8 printed in percent
    assert prose.sourced(q["16 %"], numbers) and prose.sourced(q["15.8 %"], numbers)  # 0.158 as a fraction
    assert prose.sourced(q["0.16"], numbers) and not prose.sourced(q["0.1"], numbers)


def test_a_planted_wrong_number_is_reported_with_its_cell():
    printed = "Pearson r: CNN 0.551, ViT 0.761\nobject mass 5.56x chance"
    good = _nb("RELAX agrees with NEM-U (r = 0.55 and 0.76), 5.6x chance.", printed)
    assert prose.unsourced(good, "07") == []
    planted = _nb("RELAX disagrees with NEM-U (r = −0.20 and 0.76), 5.6x chance.", printed)
    (missing,) = prose.unsourced(planted, "07")
    assert (missing.notebook, missing.cell, missing.quote) == ("07", 1, "−0.20")
    assert "disagrees with NEM-U" in missing.context


def test_code_literals_results_and_exempt_paper_figures_are_sources():
    nb = _nb("p_keep = 0.5 keeps half; the probe reaches 0.301. Broden has 63,305 images. <!-- quoted: 63,305 -->",
             code="relax(x, p_keep=0.5)")
    assert prose.unsourced(nb, extra={"01_encoders": {"probe": 0.3012}}) == []
    assert [m.quote for m in prose.unsourced(nb)] == ["0.301"]


def test_check_run_reads_notebooks_results_and_profile(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_x.ipynb").write_text(json.dumps(_nb("probe 0.301; τ = 0.10 and 0.75 %")))
    (tmp_path / "results.json").write_text(json.dumps({"cpu": {"01": {"probe": 0.30104}}}))
    (tmp_path / "run-summary.json").write_text(json.dumps({"profile": "cpu"}))
    checked, missing = prose.check_run(tmp_path)
    assert checked == 3 and [m.quote for m in missing] == ["0.75 %"]  # τ = 0.10: the cpu profile's temperature
    assert prose.main([str(tmp_path)]) == 1


def _last_cpu_run() -> Path | None:
    out = outputs_dir()
    summary = out / "run-summary.json"
    if not summary.is_file() or json.loads(summary.read_text()).get("profile") != "cpu":
        return None
    return out if any((out / "notebooks").glob("[0-9]*.ipynb")) else None


@pytest.mark.skipif(_last_cpu_run() is None, reason="no cpu run in outputs/ (make run writes one)")
def test_the_last_cpu_runs_text_quotes_only_its_figures():
    checked, missing = prose.check_run(_last_cpu_run())
    assert checked > 100
    assert not missing, "\n".join(map(str, missing))
