"""The study's Optuna study in an RDB store: a SQLite file `optuna.db` in the study's directory, so that
optuna-dashboard and `optuna.importance` read it (`optuna-dashboard sqlite:////STORAGE/NAME/optuna.db`), or a database
server (PostgreSQL) when ERCSTUDY_OPTUNA_DB gives its URL.

When the study's storage is an object store (s3://, gs://), SQLite cannot write there: the file lives in a
local cache (XDG_CACHE_HOME or ~/.cache, under ercstudy/optuna/, one directory per study URI) and a
consistent copy (SQLite's backup API) is uploaded to STORAGE/NAME/optuna.db at every save of the searcher
and every point told; a resumed study fetches it back first. Only the study's driver writes it.

In a database (ERCSTUDY_OPTUNA_DB=postgresql://USER:PASSWORD@HOST/DB when the study starts: Optuna's RDB storage,
which creates its tables on first use; a database of its own, not MLflow's), the Optuna study is named
NAME@STORAGE/NAME, nothing is copied, and optuna-dashboard reads it live. STORAGE/NAME/optuna.json records that it
lives there (the URL without its password); resuming or reporting the study then needs the same variable set.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ercstudy.platform.cluster import storage as locations

FILE = "optuna.db"
MARKER = "optuna.json"  # in the study's directory when its Optuna study lives in a database
DATABASE_ENV = "ERCSTUDY_OPTUNA_DB"


class OptunaStoreError(RuntimeError):
    """The study's Optuna study cannot be reached; the message says what to set."""


def check_database() -> None:
    """When ERCSTUDY_OPTUNA_DB is set, that its database answers (Optuna makes its tables there if need be): a study
    checks it before anything starts; OptunaStoreError (one line) otherwise."""
    url = os.environ.get(DATABASE_ENV)
    if not url:
        return
    import optuna

    try:
        optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True}).remove_session()
    except Exception as err:  # a driver missing, a refused connection, a bad URL: SQLAlchemy's and the driver's own
        raise OptunaStoreError(f"{DATABASE_ENV}={without_password(url)}: {type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None


def without_password(url: str) -> str:
    """A database URL as it may be written down: its password replaced by ***."""
    scheme, netloc, path, query, fragment = urllib.parse.urlsplit(url)
    user, at, host = netloc.rpartition("@")
    if not at or ":" not in user:
        return url
    return urllib.parse.urlunsplit((scheme, f"{user.split(':', 1)[0]}:***@{host}", path, query, fragment))


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ercstudy" / "optuna"


@dataclass(frozen=True)
class OptunaStore:
    """Where one study's Optuna SQLite file lives (`local`) and, for remote storage, where its copy goes (`remote`)."""

    directory: str  # the study's directory: an absolute path or a URI (STORAGE/NAME)

    @property
    def location(self) -> locations.Location:
        return locations.resolve(self.directory) / FILE

    @functools.cached_property
    def in_database(self) -> bool:
        """Whether this study's Optuna study lives in a database: its directory's optuna.json says so (reset() writes
        it for a new study when ERCSTUDY_OPTUNA_DB is set). Cached: a bool, never the URL (stores are pickled)."""
        return (locations.resolve(self.directory) / MARKER).is_file()

    def where(self, name: str) -> str:
        """Where the Optuna study of the study `name` is, in words fit for a terminal or a report (no password)."""
        if self.in_database:
            return f"the study {self.study_name(name)!r} in {without_password(self.database())}"
        return str(self.location)

    def database(self) -> str:
        url = os.environ.get(DATABASE_ENV)
        if not url:
            raise OptunaStoreError(f"{self.directory}: its Optuna study lives in a database ({MARKER} there says which); "
                                   f"set {DATABASE_ENV} to that database's URL")
        return url

    def check(self) -> None:
        """Raises OptunaStoreError (one line) when the study's Optuna study lives in a database whose URL is not set."""
        if self.in_database:
            self.database()

    def study_name(self, name: str) -> str:
        """The Optuna study's name: the study's own in its optuna.db; in a shared database, NAME@STORAGE/NAME."""
        return f"{name}@{self.directory.rstrip('/')}" if self.in_database else name

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
        if self.in_database:
            return self.database()
        return f"sqlite:///{self.local}"  # an absolute path: four slashes

    def reset(self, name: str) -> None:
        """A new study: in the database of ERCSTUDY_OPTUNA_DB when it is set (recorded in optuna.json; an earlier
        Optuna study of the same directory is deleted), else optuna.db, with no stale cached copy of an earlier study
        at the same URI."""
        url = os.environ.get(DATABASE_ENV)
        if url:
            import optuna

            marker = locations.resolve(self.directory) / MARKER
            marker.write_text(json.dumps({"database": without_password(url), "env": DATABASE_ENV}, indent=2))
            self.__dict__["in_database"] = True
            with contextlib.suppress(KeyError):  # none: the usual case
                optuna.delete_study(study_name=self.study_name(name), storage=url)
            return
        self.__dict__["in_database"] = False
        if self.remote and self.local.exists():
            self.local.unlink()
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def fetch(self) -> bool:
        """The stored copy into the local cache (remote storage); False when there is none. A database needs none."""
        if self.in_database:
            return True
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
        """A consistent copy of the local file to the study's storage (nothing to do when local or in a database)."""
        if self.in_database or not self.remote or not self.local.is_file():
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

        return optuna.create_study(storage=self.url, study_name=self.study_name(name), directions=directions, sampler=sampler,
                                   pruner=optuna.pruners.NopPruner(), load_if_exists=True)

    def load(self, name: str, sampler: Any = None) -> Any:
        import optuna

        return optuna.load_study(study_name=self.study_name(name), storage=self.url, sampler=sampler, pruner=optuna.pruners.NopPruner())


@contextlib.contextmanager
def read_study(directory: str, name: str) -> Iterator[Any]:
    """The persisted Optuna study of STORAGE/NAME for reading (a temporary download when remote), or None."""
    s = OptunaStore(directory)
    if s.in_database:
        try:
            study = s.load(name)
        except KeyError:
            raise OptunaStoreError(f"{s.where(name)}: no such Optuna study (the study's driver died before making it, or "
                                   f"its storage was at another path then)") from None
        yield study
        return
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
