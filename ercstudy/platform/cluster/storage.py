"""Where a study lives: a path every node mounts (NFS, or a local disk on one machine), or an object
store URI (`s3://bucket/prefix`, `gs://bucket/prefix`).

Ray Tune and Ray Train write there themselves (the URI is their `storage_path`: the experiment state,
each trial's Train run and checkpoints); ercstudy's own files (study.yaml, study.json, the leaderboard,
the report) go through the same pyarrow filesystem (`Location`), so that nothing of a study is kept on
the local disk when its storage is remote, beyond temporary copies deleted after use (`local_copy`).
Credentials and endpoints come from the standard environment that pyarrow and boto3 read
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ..., `GOOGLE_APPLICATION_CREDENTIALS`): MinIO or
any S3-compatible store works with no ercstudy setting.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

OBJECT_STORES = ("s3", "gs", "gcs")
PROBE = ".ercstudy-probe"


class StorageError(RuntimeError):
    """The storage cannot be used: one line that says why and what to do."""


@dataclass(frozen=True)
class Location:
    """A file or directory on a study's storage: `uri` is what Ray and messages get, (`fs`, `path`) what pyarrow reads."""

    uri: str  # s3://bucket/prefix/... or an absolute local path
    fs: pafs.FileSystem
    path: str  # the path on fs (bucket/prefix/... for object stores)

    @property
    def remote(self) -> bool:
        return "://" in self.uri

    def __truediv__(self, name: str) -> Location:
        return Location(posixpath.join(self.uri, name), self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.uri

    @property
    def parent(self) -> Location:
        return Location(posixpath.dirname(self.uri), self.fs, posixpath.dirname(self.path))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def children(self) -> list[str]:
        """Names of the entries directly inside (none for a directory that does not exist)."""
        if not self.is_dir():
            return []
        return sorted(i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.path)))

    def read_text(self) -> str:
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def write_text(self, text: str) -> None:
        if not self.remote:  # object stores have no directories to make (pyarrow would write a marker object)
            os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(text.encode())

    def upload(self, local_dir: str | Path) -> None:
        """The files of a local directory into this directory (which may exist; same names are replaced)."""
        if not self.remote:
            os.makedirs(self.path, exist_ok=True)
        pafs.copy_files(str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This directory as a local path inside the block: itself when local, else a temporary download deleted after."""
        if not self.remote:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="ercstudy-") as tmp:
            target = Path(tmp) / (self.name or "download")
            pafs.copy_files(self.path, str(target), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield target



def train_run_name(trial_id: str) -> str:
    """The name of a study trial's Ray Train run (its folder under STORAGE/NAME/train): the Tune trial id's, stable
    across `ercstudy resume`, so that Train resumes from the run's checkpoint."""
    return f"train-{trial_id}"

def is_uri(storage: str) -> bool:
    return "://" in str(storage)


def resolve(storage: str | os.PathLike, *, multi_node: bool = False) -> Location:
    """STORAGE as a Location. A local path is made absolute; on a multi-node cluster a relative one is
    refused (it would name a different directory on every node)."""
    storage = str(storage)
    if not storage.strip():
        raise StorageError("storage: empty; give a path every node mounts or a URI such as s3://bucket/prefix")
    scheme = storage.split("://", 1)[0].lower() if is_uri(storage) else ""
    if scheme in ("", "file", "local"):
        path = os.path.expanduser(storage.split("://", 1)[1] if scheme else storage)
        if multi_node and not os.path.isabs(path):
            raise StorageError(f"storage {storage!r} is a relative path, which every node of a cluster resolves in its own "
                               f"working directory: give a URI (s3://bucket/prefix, gs://...) or an absolute path that every node mounts")
        path = os.path.abspath(path)
        return Location(path, pafs.LocalFileSystem(), path)
    if scheme not in OBJECT_STORES:
        raise StorageError(f"storage {storage!r}: unknown scheme {scheme}://; use s3://, gs://, or a path")
    try:
        fs, path = pafs.FileSystem.from_uri(storage)
    except (OSError, ValueError, TypeError) as err:
        raise StorageError(f"storage {storage}: {_first_line(err)}") from None
    return Location(storage.rstrip("/"), fs, path.rstrip("/"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _s3_credentials_found() -> bool | None:
    """Whether the standard AWS credential chain yields credentials (None: botocore, which resolves it, is not installed)."""
    try:
        import botocore.session
    except ImportError:
        return None
    try:
        return botocore.session.get_session().get_credentials() is not None
    except Exception:  # a broken profile or config file: pyarrow's own error will say more at the probe
        return True


def why(loc: Location, err: BaseException) -> str:
    """An object store's error as one line that names the cause (endpoint, bucket, credentials)."""
    text = _first_line(err)
    bucket = loc.path.split("/", 1)[0]
    if "NETWORK_CONNECTION" in text or "curlCode" in text:
        return f"storage {loc.uri}: cannot reach {_s3_endpoint() if loc.uri.startswith('s3') else 'the object store'} ({text})"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"storage {loc.uri}: bucket {bucket!r} does not exist; create it first"
    if any(s in text for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        return f"storage {loc.uri}: access denied; check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE / the node's role): {text}"
    return f"storage {loc.uri}: {text}"


def check(loc: Location, *, write: bool = True) -> None:
    """Fail in one line, before any trial starts, when the storage cannot be used: an unreachable endpoint,
    a missing bucket, no credentials, or (write=True) a place this process cannot write to."""
    if not loc.remote:
        if write:  # nothing is made here: the nearest existing directory on the way must let us create the rest
            existing = loc.path
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
                raise StorageError(f"storage {loc.uri}: cannot write there ({existing} is not a writable directory)")
        return
    if loc.uri.startswith("s3") and _s3_credentials_found() is False:
        raise StorageError(f"storage {loc.uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                           f"AWS_PROFILE, or run where the node's role provides them)")
    bucket = loc.path.split("/", 1)[0]
    try:
        if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise StorageError(f"storage {loc.uri}: bucket {bucket!r} does not exist; create it first")
        if write:  # a bucket may be listable but not writable: write and delete a marker
            probe = loc / f"{PROBE}-{os.getpid()}"
            with loc.fs.open_output_stream(probe.path) as f:
                f.write(b"ok")
            loc.fs.delete_file(probe.path)
    except OSError as err:
        raise StorageError(why(loc, err)) from None


def find_checkpoint(spec: str, storage: str) -> Location:
    """What `ercstudy eval` is given: a checkpoint directory or URI, a Train run directory or URI (its newest
    checkpoint), or STUDY/TRIAL (that trial's Train run in STORAGE, as the leaderboard names it)."""
    import re

    from ercstudy.trainables.checkpoint import CHECKPOINT_TAG, CheckpointError, newest, not_a_checkpoint

    if not is_uri(spec) and not os.path.exists(spec) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/\w+", spec):
        study, trial = spec.split("/")
        loc = resolve(storage) / study / "train" / train_run_name(trial)
        check(loc, write=False)
        if not loc.is_dir():
            raise CheckpointError(f"{spec}: no such checkpoint directory, nor a trial {trial!r} of a study {study!r} in {storage} "
                                  f"(looked for {loc}; --storage says where studies are)")
    else:
        loc = resolve(spec)
        if not loc.remote:
            return loc  # checkpoint.resolve reads a local one
        check(loc, write=False)
    if not loc.remote:
        return loc
    names = loc.children()
    if not names:
        raise CheckpointError(f"{spec}: no such checkpoint directory")
    if CHECKPOINT_TAG in names:
        return loc
    found = newest(n for n in names if n.startswith("checkpoint_") and (loc / n / CHECKPOINT_TAG).is_dir())
    if found is None:
        raise not_a_checkpoint(spec)
    return loc / found
