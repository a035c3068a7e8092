"""The results summary of ``make run``: per-notebook records gathered into results.md and results.json."""

import json

import pytest

from nemu_lib import results


def test_records_become_results_md_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    path = results.record("01_encoders", {"simclr_linear_probe": 0.26123, "trained": True}, profile="cpu")
    assert path == tmp_path / "results" / "cpu" / "01_encoders.json"
    row = {"method": "NEM-U", "seconds_per_image": 0.001, "complexity": 6.5, "complexity_sem": 0.1}
    results.record("04_evaluation", {"simclr": {"table": [row], "speedup_nemu_vs_relax": 2000.0}}, profile="cpu")
    results.main([str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "## Profile `cpu`" in text and "### 01_encoders (profile: cpu)" in text
    assert "| simclr_linear_probe | 0.2612 |" in text
    assert "#### simclr" in text and "| NEM-U |" in text and "6.500 ± 0.100" in text
    assert "- speedup_nemu_vs_relax: 2000" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["cpu"]["04_evaluation"]["values"]["simclr"]["table"] == [row]
    assert data["cpu"]["01_encoders"]["profile"] == "cpu"
    assert "NEM-U" in capsys.readouterr().out


def test_each_profile_keeps_its_own_table(tmp_path, monkeypatch):
    """A gpu run beside a cpu run: two sections, cpu first (the profiles' order), neither overwritten."""
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    results.record("01_encoders", {"simclr_linear_probe": 0.61}, profile="gpu")
    results.record("01_encoders", {"simclr_linear_probe": 0.33}, profile="cpu")
    text = results.summarize(tmp_path)
    assert text.index("## Profile `cpu`") < text.index("## Profile `gpu`")
    assert "| simclr_linear_probe | 0.33 |" in text and "| simclr_linear_probe | 0.61 |" in text
    assert set(results.gather(tmp_path)) == {"cpu", "gpu"}


def test_no_records_yet(tmp_path):
    assert "No results recorded yet" in results.summarize(tmp_path)


def test_a_notebook_reads_another_notebooks_record_of_its_own_profile(tmp_path, monkeypatch):
    """Notebook 06 quotes notebook 03's figures: from the same profile's record, ``{}`` before 03 has run."""
    monkeypatch.setenv("NEMU_OUTPUTS", str(tmp_path))
    assert results.recorded("03_nemu", "cpu") == {}
    results.record("03_nemu", {"mask_mass_share_over_chance": 2.4}, profile="cpu")
    results.record("03_nemu", {"mask_mass_share_over_chance": 3.1}, profile="gpu")
    assert results.recorded("03_nemu", "cpu") == {"mask_mass_share_over_chance": 2.4}
    assert results.recorded("03_nemu", "gpu") == {"mask_mass_share_over_chance": 3.1}
    assert results.record_path("03_nemu", "cpu") == tmp_path / "results" / "cpu" / "03_nemu.json"


def test_differences_leave_out_timings_and_find_every_other_change(capsys, tmp_path):
    a = {"cpu": {"04": {"values": {"simclr": {"table": [{"method": "RELAX", "seconds_per_image": 0.3, "r": 0.9}],
                                              "speedup_nemu_vs_relax": 2000.0}, "probe": 0.33, "time_s": 1,
                       "latency_nemu_single_image": 0.002, "nemu_over_encoder": 1.3, "mask_inside_over_outside": 3.2}}}}
    b = json.loads(json.dumps(a))
    b["cpu"]["04"]["values"]["simclr"]["table"][0]["seconds_per_image"] = 0.4
    b["cpu"]["04"]["values"]["simclr"]["speedup_nemu_vs_relax"] = 1800.0
    b["cpu"]["04"]["values"].update(latency_nemu_single_image=0.003, nemu_over_encoder=1.1)
    assert results.differences(a, b) == []
    b["cpu"]["04"]["values"]["mask_inside_over_outside"] = 3.3  # a ratio of two results, not of two timings
    assert results.differences(a, b) == ["cpu.04.values.mask_inside_over_outside: 3.2 -> 3.3"]
    b["cpu"]["04"]["values"]["mask_inside_over_outside"] = 3.2
    b["cpu"]["04"]["values"]["simclr"]["table"][0]["r"] = 0.91
    b["cpu"]["04"]["values"]["probe"] = 0.34
    assert sorted(results.differences(a, b)) == ["cpu.04.values.probe: 0.33 -> 0.34",
                                                 "cpu.04.values.simclr.table[0].r: 0.9 -> 0.91"]
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for f, d in zip(files, (a, b), strict=True):
        f.write_text(json.dumps(d))
    with pytest.raises(SystemExit) as stop:
        results.main(["--compare", *map(str, files)])
    assert stop.value.code == 1
    assert "probe: 0.33 -> 0.34" in capsys.readouterr().out
