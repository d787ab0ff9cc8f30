"""The corpora researchers have, read as (domain, document) records, streamed: never silent garbage.

Formats, by the file's extension (after an optional compression suffix):
  text   .txt .text .md           documents separated by blank lines
  JSONL  .jsonl .ndjson .json     one JSON object per line, the document in a field (--text-field, default `text`)
  Parquet  .parquet               a column (--column / --text-field, default `text`)
  Arrow  a folder of *.arrow      as `datasets.save_to_disk` writes it (Arrow IPC streams; read with pyarrow)
Compression: .gz, .bz2, .xz, .zst (gzip, bz2, lzma from Python, zstd through pyarrow). An input is a path or a URI
(s3://bucket/prefix/..., gs://...: read through pyarrow's filesystems, streamed), a directory (the supported files
inside it; an Arrow folder stands for itself) or a glob (`corpus/*.jsonl.gz`, `s3://bucket/dolma/**/*.json.gz`: the
files it matches, sorted). Anything else, or a file whose content is not UTF-8 text (a NUL byte, an invalid
sequence), is refused with one line naming the file and the accepted formats.

A record's domain is its file's name (the stem without its format and compression suffixes), or the value of a field
(--domain-field, e.g. Dolma's `source`, the Pile's `pile_set_name`) for JSONL, Parquet and Arrow inputs.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from ercstudy.trainables.shards import DataError, filesystem, first_line, is_uri

TEXT = (".txt", ".text", ".md")
JSONL = (".jsonl", ".ndjson", ".json")
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd")
ACCEPTED = ("text (.txt, .md), JSONL (.jsonl, .ndjson, .json), Parquet (.parquet) or a `datasets.save_to_disk` folder "
            "of .arrow files, each optionally .gz, .bz2, .xz or .zst")
ROWS_PER_BATCH = 256
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """One input: where it is, how to read it, and its domain when no field names one."""

    where: str  # as errors name it: the path or URI (a directory's or a glob's files: each its own)
    fs: Any  # its pyarrow filesystem (local or an object store)
    path: str  # its path inside `fs`
    kind: str  # text | jsonl | parquet | arrow
    compression: str | None  # the suffix (.gz, ...) or None
    name: str  # the file's stem without format and compression suffixes


def sources(inputs: list[str]) -> list[Source]:
    """The inputs as Sources (directories and globs expanded), each checked to exist and have a format it can be read
    as; a glob that matches nothing, or a directory with nothing readable, is refused. One stat per input and one
    listing per directory or glob: a file found by a listing is not asked about again (on an object store, each
    question is a request)."""
    out = []
    for spec in inputs:
        if any(c in spec for c in GLOB_CHARS):
            fs, base, pattern = glob_filesystem(spec)
            found, empty = glob(fs, base, pattern), "no file matches that ercstudy reads"
        else:
            fs, path = filesystem(spec)
            top = info(fs, path, spec)
            if top.type.name != "Directory" or arrow_files(fs, path):
                out.append(source(fs, top, spec))
                continue
            found, empty = files_under(fs, path), "a directory with no file ercstudy reads"
        readable = [i for i in found if kind_of(fs, i)[0] is not None]
        if not readable:
            raise DataError(f"input {spec}: {empty}; it reads {ACCEPTED}")
        out += [source(fs, i, named(spec, i.path)) for i in readable]
    return out


def glob_filesystem(spec: str) -> tuple[Any, str, str]:
    """(filesystem, base, pattern) of a glob: the filesystem and the folder inside it are resolved from the glob's
    part before its first glob character (pyarrow refuses a URI with `?` or `[` in it, which it reads as a query or a
    host); the pattern is the whole glob inside the filesystem."""
    parts = spec.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))
    fixed = "/".join(parts[:first]) or ("/" if first else ".")  # "/*.txt": the root; "*.txt": here
    fs, base = filesystem(fixed)
    return fs, base, base.rstrip("/") + "/" + "/".join(parts[first:])


def named(spec: str, found: str) -> str:
    """How errors name a file found under a directory or a glob: `spec`'s own form (a path or a URI)."""
    if is_uri(spec):
        return spec.split("://", 1)[0] + "://" + found
    return found


def info(fs: Any, path: str, where: str) -> Any:
    import pyarrow as pa

    try:
        return fs.get_file_info(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"input {where}: {first_line(err)}") from None


def files_under(fs: Any, path: str) -> list[Any]:
    """The files under a folder, at any depth, sorted by path (pyarrow FileInfos)."""
    import pyarrow.fs as pafs

    return sorted((i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.type.name == "File"),
                  key=lambda i: i.path)


def arrow_files(fs: Any, path: str) -> list[str]:
    import pyarrow.fs as pafs

    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                  if i.type.name == "File" and i.path.endswith(".arrow"))


def glob(fs: Any, base: str, pattern: str) -> list[Any]:
    """What `pattern` matches under `base` (its longest folder without a glob character), sorted by path: files, and
    Arrow folders (one input each); listed once, recursively."""
    import pyarrow.fs as pafs

    if info(fs, base, base).type.name != "Directory":
        return []
    regex = glob_regex(pattern)
    entries = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if regex.fullmatch(i.path)]
    return sorted((i for i in entries if i.type.name == "File" or (i.type.name == "Directory" and arrow_files(fs, i.path))),
                  key=lambda i: i.path)


def glob_regex(pattern: str) -> re.Pattern:
    """A glob as a regular expression: `*` and `?` within a name, `[...]` a class, `**/` any folders (or none)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1:j].replace("!", "^", 1) + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def kind_of(fs: Any, found: Any) -> tuple[str | None, str | None]:
    """(format, compression suffix) of a file (a pyarrow FileInfo) by its name, of a folder by whether it holds Arrow
    files; format None when it is none ercstudy reads."""
    if found.type.name == "Directory":
        return ("arrow" if arrow_files(fs, found.path) else None), None
    suffixes = suffixes_of(found.path)
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION else None
    ext = suffixes[-1] if suffixes else ""
    kind = "text" if ext in TEXT else "jsonl" if ext in JSONL else "parquet" if ext == ".parquet" and not compression else None
    return kind, compression


def suffixes_of(path: str) -> list[str]:
    name = posixpath.basename(path.rstrip("/"))
    return ["." + s.lower() for s in name.split(".")[1:]] if not name.startswith(".") else []


def source(fs: Any, found: Any, where: str) -> Source:
    """The input at `found` (a pyarrow FileInfo), named `where` in errors."""
    if found.type.name == "NotFound":
        raise DataError(f"input {where}: no such file")
    kind, compression = kind_of(fs, found)
    if kind is None:
        raise DataError(f"input {where}: not a format ercstudy reads; it reads {ACCEPTED}")
    path = found.path
    name = posixpath.basename(path.rstrip("/"))
    if kind != "arrow":
        for suffix in reversed(suffixes_of(path)):
            if suffix in (*COMPRESSION, *TEXT, *JSONL, ".parquet"):
                name = name[: -len(suffix)]
            else:
                break
    return Source(where, fs, path, kind, compression, name)


def open_binary(src: Source) -> IO[bytes]:
    """The file's bytes, decompressed, streamed from its filesystem."""
    import pyarrow as pa

    # we decompress (by the suffix, as the format says); on an object store, where every read is a request, read
    # ahead 1 MiB at a time (a local file is read through Python's own buffer below)
    local = src.fs.type_name == "local"
    raw = src.fs.open_input_stream(src.path, compression=None, buffer_size=0 if local else 1 << 20)
    if src.compression in (".zst", ".zstd"):
        raw = pa.CompressedInputStream(raw, "zstd")
    stream = io.BufferedReader(raw)
    if src.compression == ".gz":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if src.compression == ".bz2":
        return bz2.BZ2File(stream, "rb")
    if src.compression == ".xz":
        return lzma.LZMAFile(stream, "rb")
    return stream


def lines(src: Source) -> Iterator[str]:
    """The file's lines as text; a file that is not UTF-8 text is refused at the first line that is not."""
    with open_binary(src) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")  # a truncated archive raises OSError/EOFError
        number = 0
        try:
            for number, line in enumerate(text, 1):  # noqa: B007 (the number names the line of an error)
                if "\x00" in line:
                    raise DataError(f"input {src.where}: line {number} holds a NUL byte: not text; it reads {ACCEPTED}")
                yield line
        except UnicodeDecodeError:
            raise DataError(f"input {src.where}: not UTF-8 text at line {number + 1} (binary or another encoding); "
                            f"it reads {ACCEPTED}") from None
        except (OSError, EOFError, lzma.LZMAError) as err:
            raise DataError(f"input {src.where}: cannot decompress ({str(err).splitlines()[0]}); it reads {ACCEPTED}") from None


def records(src: Source, *, text_field: str = "text", domain_field: str | None = None) -> Iterator[tuple[str, str]]:
    """(domain, document) of every non-blank document of one input, in file order."""
    if src.kind == "text":
        if domain_field:
            raise DataError(f"input {src.where}: --domain-field needs records with fields (JSONL, Parquet, Arrow); a text "
                            f"file is one domain, its name")
        yield from ((src.name, doc) for doc in text_documents(lines(src)))
    elif src.kind == "jsonl":
        yield from jsonl_records(src, text_field, domain_field)
    else:
        for batch in table_batches(src, text_field, domain_field):
            texts = batch.column(text_field).to_pylist()
            domains = batch.column(domain_field).to_pylist() if domain_field else [src.name] * len(texts)
            for doc, domain in zip(texts, domains):
                if isinstance(doc, str) and doc.strip():
                    yield str(domain), doc


def text_documents(text: Iterator[str]) -> Iterator[str]:
    """Blank-line-separated blocks of a text stream."""
    block: list[str] = []
    for line in text:
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).strip()
            block = []
    if block:
        yield "".join(block).strip()


def jsonl_records(src: Source, text_field: str, domain_field: str | None) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(lines(src), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"input {src.where}: line {number} is not a JSON object ({err.msg}); a JSONL file holds one per "
                            f"line") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"input {src.where}: line {number} has no field {text_field!r} (it has: {fields}); pass --text-field")
        if domain_field and domain_field not in record:
            raise DataError(f"input {src.where}: line {number} has no field {domain_field!r} for --domain-field")
        doc = record[text_field]
        if isinstance(doc, str) and doc.strip():
            yield (str(record[domain_field]) if domain_field else src.name), doc


def table_batches(src: Source, text_field: str, domain_field: str | None):
    """Record batches of a Parquet file or an Arrow folder, with the columns checked first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [text_field, *([domain_field] if domain_field else [])]
    if src.kind == "parquet":
        with src.fs.open_input_file(src.path) as f:
            parquet = pq.ParquetFile(f)
            check_columns(src, parquet.schema_arrow.names, columns)
            yield from parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns)
        return
    for path in arrow_files(src.fs, src.path):  # datasets' save_to_disk: Arrow IPC streams
        try:
            reader = pa.ipc.open_stream(src.fs.open_input_file(path))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(src.fs.open_input_file(path))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        check_columns(src, reader.schema.names, columns)
        for batch in batches:
            yield batch.select(columns)


def check_columns(src: Source, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"input {src.where}: no column {missing[0]!r} (columns: {', '.join(names)}); pass --text-field "
                        f"/ --domain-field")
