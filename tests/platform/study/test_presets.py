"""The study presets come with the install (ercstudy/presets: links to search_spaces/*.yaml, carried as files by a
wheel), found by name from any directory."""

import subprocess
import sys
import zipfile
from pathlib import Path

from ercstudy.platform.cli import main
from ercstudy.platform.study.presets import presets

REPO = Path(__file__).resolve().parents[3]


def test_every_shipped_study_is_a_preset_with_the_same_text():
    shipped = {p.stem: p.read_text() for p in (REPO / "search_spaces").glob("*.yaml")}
    found = presets()
    assert set(found) == set(shipped) and "quickstart" in found
    assert all(found[name].read_text() == text for name, text in shipped.items())


def test_a_preset_is_found_by_name_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "quickstart"]) == 0 and main(["dry-run", "quickstart.yaml", "search.num_trials=2"]) == 0
    assert "2 trials = (2 point(s)) x 1 seed(s)" in capsys.readouterr().out
    assert main(["presets"]) == 0 and capsys.readouterr().out.startswith("alpha_epsilon ")
    assert main(["validate", "quickstrat"]) == 2
    assert "no such file, and no preset of that name (presets: alpha_epsilon, " in capsys.readouterr().err
    (tmp_path / "quickstart").write_text("name: mine\n")  # a path always wins over a preset's name
    assert main(["validate", "quickstart"]) == 2 and "(in quickstart)" in capsys.readouterr().err


def test_a_wheel_carries_the_presets_and_the_license(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("ercstudy-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("ercstudy/presets/quickstart.yaml") == (REPO / "search_spaces" / "quickstart.yaml").read_bytes()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names) and "License-Expression: Apache-2.0" in metadata
