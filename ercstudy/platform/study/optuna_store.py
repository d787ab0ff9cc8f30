"""The study's Optuna study in an RDB store: a SQLite file `optuna.db` in the study's directory, so that
optuna-dashboard and `optuna.importance` read it (`optuna-dashboard sqlite:////STORAGE/NAME/optuna.db`).

When the study's storage is an object store (s3://, gs://), SQLite cannot write there: the file lives in a
local cache (XDG_CACHE_HOME or ~/.cache, under ercstudy/optuna/, one directory per study URI) and a
consistent copy (SQLite's backup API) is uploaded to STORAGE/NAME/optuna.db at every save of the searcher
and every point told; a resumed study fetches it back first. Only the study's driver writes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ercstudy.platform.cluster import storage as locations

FILE = "optuna.db"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ercstudy" / "optuna"


@dataclass(frozen=True)
class OptunaStore:
    """Where one study's Optuna SQLite file lives (`local`) and, for remote storage, where its copy goes (`remote`)."""

    directory: str  # the study's directory: an absolute path or a URI (STORAGE/NAME)

    @property
    def location(self) -> locations.Location:
        return locations.resolve(self.directory) / FILE

    @property
    def remote(self) -> bool:
        return locations.is_uri(self.directory)

    @property
    def local(self) -> Path:
        if not self.remote:
            return Path(self.location.path)
        key = hashlib.sha1(self.directory.rstrip("/").encode()).hexdigest()[:16]
        return cache_root() / key / FILE

    @property
    def url(self) -> str:
        return f"sqlite:///{self.local}"  # an absolute path: four slashes

    def reset(self) -> None:
        """A new study: no stale cached copy of an earlier study at the same URI."""
        if self.remote and self.local.exists():
            self.local.unlink()
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def fetch(self) -> bool:
        """The stored copy into the local cache (remote storage); False when there is none."""
        self.local.parent.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return self.local.is_file()
        loc = self.location
        if not loc.is_file():
            return False
        tmp = self.local.with_suffix(".download")
        with loc.fs.open_input_stream(loc.path) as src, tmp.open("wb") as dst:
            dst.write(src.read())
        os.replace(tmp, self.local)
        return True

    def save(self) -> None:
        """A consistent copy of the local file to the study's storage (nothing to do when local)."""
        if not self.remote or not self.local.is_file():
            return
        with tempfile.TemporaryDirectory(prefix="ercstudy-optuna-") as tmp:
            snapshot = Path(tmp) / FILE
            src, dst = sqlite3.connect(self.local), sqlite3.connect(snapshot)
            try:
                src.backup(dst)
            finally:
                src.close()
                dst.close()
            loc = self.location
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(snapshot.read_bytes())

    def create(self, name: str, directions: list[str], sampler: Any) -> Any:
        import optuna

        return optuna.create_study(storage=self.url, study_name=name, directions=directions, sampler=sampler,
                                   pruner=optuna.pruners.NopPruner(), load_if_exists=True)

    def load(self, name: str, sampler: Any = None) -> Any:
        import optuna

        return optuna.load_study(study_name=name, storage=self.url, sampler=sampler, pruner=optuna.pruners.NopPruner())


@contextlib.contextmanager
def read_study(directory: str, name: str) -> Iterator[Any]:
    """The persisted Optuna study of STORAGE/NAME for reading (a temporary download when remote), or None."""
    s = OptunaStore(directory)
    if not s.remote:
        yield s.load(name) if s.local.is_file() else None
        return
    loc = s.location
    if not loc.is_file():
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ercstudy-optuna-") as tmp:
        local = Path(tmp) / FILE
        with loc.fs.open_input_stream(loc.path) as src:
            local.write_bytes(src.read())
        import optuna

        yield optuna.load_study(study_name=name, storage=f"sqlite:///{local}")
