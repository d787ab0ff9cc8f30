"""The study presets that come with the install (the package ercstudy.presets: search_spaces/*.yaml), found by name:
`ercstudy run quickstart` works from any directory; a path to a file always wins."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ercstudy.trainables.validation import ConfigError


def presets() -> dict[str, Path]:
    """name -> the installed preset file, by name."""
    root = resources.files("ercstudy.presets")
    return {Path(str(f)).stem: Path(str(f)) for f in sorted(root.iterdir(), key=str) if str(f).endswith(".yaml")}


def description(path: Path) -> str:
    """A preset's first comment line: what it studies."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def study_file(spec: str) -> str:
    """The file a command reads for `spec`: the path itself when it exists, else the preset it names
    (`quickstart` or `quickstart.yaml`); neither is one line that lists the presets."""
    if Path(spec).exists():
        return spec
    found = presets()
    name = Path(spec).stem if Path(spec).name == spec else None
    if name in found:
        return str(found[name])
    raise ConfigError("", f"{spec}: no such file, and no preset of that name (presets: {', '.join(found)}; `ercstudy presets` lists them)")
