"""The corpora researchers have, read as (domain, document) records, streamed: never silent garbage.

Formats, by the file's extension (after an optional compression suffix):
  text   .txt .text .md           documents separated by blank lines
  JSONL  .jsonl .ndjson .json     one JSON object per line, the document in a field (--text-field, default `text`)
  Parquet  .parquet               a column (--column / --text-field, default `text`)
  Arrow  a folder of *.arrow      as `datasets.save_to_disk` writes it (Arrow IPC streams; read with pyarrow)
Compression: .gz, .bz2, .xz, .zst (gzip, bz2, lzma from Python, zstd through pyarrow). A directory given as an input
stands for the supported files inside it (an Arrow folder for itself). Anything else, or a file whose content is not
UTF-8 text (a NUL byte, an invalid sequence), is refused with one line naming the file and the accepted formats.

A record's domain is its file's name (the stem without its format and compression suffixes), or the value of a field
(--domain-field, e.g. Dolma's `source`, the Pile's `pile_set_name`) for JSONL, Parquet and Arrow inputs.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ercstudy.trainables.shards import DataError

TEXT = (".txt", ".text", ".md")
JSONL = (".jsonl", ".ndjson", ".json")
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd")
ACCEPTED = ("text (.txt, .md), JSONL (.jsonl, .ndjson, .json), Parquet (.parquet) or a `datasets.save_to_disk` folder "
            "of .arrow files, each optionally .gz, .bz2, .xz or .zst")
ROWS_PER_BATCH = 256


@dataclass(frozen=True)
class Source:
    """One input: where it is, how to read it, and its domain when no field names one."""

    path: Path
    kind: str  # text | jsonl | parquet | arrow
    compression: str | None  # the suffix (.gz, ...) or None
    name: str  # the file's stem without format and compression suffixes


def sources(inputs: list[str]) -> list[Source]:
    """The inputs as Sources (directories expanded), each checked to exist and have a format it can be read as."""
    out = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir() and not any(path.glob("*.arrow")):
            inside = sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p)[0] is not None)
            if not inside:
                raise DataError(f"input {path}: a directory with no file ercstudy reads; it reads {ACCEPTED}")
            out += [source(p) for p in inside]
        else:
            out.append(source(path))
    return out


def kind_of(path: Path) -> tuple[str | None, str | None]:
    """(format, compression suffix) of a file by its name; format None when it is none ercstudy reads."""
    if path.is_dir():
        return ("arrow" if any(path.glob("*.arrow")) else None), None
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSION else None
    ext = suffixes[-1] if suffixes else ""
    kind = "text" if ext in TEXT else "jsonl" if ext in JSONL else "parquet" if ext == ".parquet" and not compression else None
    return kind, compression


def source(path: Path) -> Source:
    if not path.exists():
        raise DataError(f"input {path}: no such file")
    kind, compression = kind_of(path)
    if kind is None:
        raise DataError(f"input {path}: not a format ercstudy reads; it reads {ACCEPTED}")
    name = path.name
    for suffix in reversed(path.suffixes if not path.is_dir() else []):
        if suffix.lower() in (*COMPRESSION, *TEXT, *JSONL, ".parquet"):
            name = name[: -len(suffix)]
        else:
            break
    return Source(path, kind, compression, name)


def open_binary(src: Source) -> IO[bytes]:
    if src.compression == ".gz":
        return gzip.open(src.path, "rb")
    if src.compression == ".bz2":
        return bz2.open(src.path, "rb")
    if src.compression == ".xz":
        return lzma.open(src.path, "rb")
    if src.compression in (".zst", ".zstd"):
        import pyarrow as pa

        return pa.CompressedInputStream(pa.OSFile(str(src.path)), "zstd")
    return open(src.path, "rb")


def lines(src: Source) -> Iterator[str]:
    """The file's lines as text; a file that is not UTF-8 text is refused at the first line that is not."""
    with open_binary(src) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")  # a truncated archive raises OSError/EOFError
        number = 0
        try:
            for number, line in enumerate(text, 1):  # noqa: B007 (the number names the line of an error)
                if "\x00" in line:
                    raise DataError(f"input {src.path}: line {number} holds a NUL byte: not text; it reads {ACCEPTED}")
                yield line
        except UnicodeDecodeError:
            raise DataError(f"input {src.path}: not UTF-8 text at line {number + 1} (binary or another encoding); "
                            f"it reads {ACCEPTED}") from None
        except (OSError, EOFError, lzma.LZMAError) as err:
            raise DataError(f"input {src.path}: cannot decompress ({str(err).splitlines()[0]}); it reads {ACCEPTED}") from None


def records(src: Source, *, text_field: str = "text", domain_field: str | None = None) -> Iterator[tuple[str, str]]:
    """(domain, document) of every non-blank document of one input, in file order."""
    if src.kind == "text":
        if domain_field:
            raise DataError(f"input {src.path}: --domain-field needs records with fields (JSONL, Parquet, Arrow); a text "
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
            raise DataError(f"input {src.path}: line {number} is not a JSON object ({err.msg}); a JSONL file holds one per "
                            f"line") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"input {src.path}: line {number} has no field {text_field!r} (it has: {fields}); pass --text-field")
        if domain_field and domain_field not in record:
            raise DataError(f"input {src.path}: line {number} has no field {domain_field!r} for --domain-field")
        doc = record[text_field]
        if isinstance(doc, str) and doc.strip():
            yield (str(record[domain_field]) if domain_field else src.name), doc


def table_batches(src: Source, text_field: str, domain_field: str | None):
    """Record batches of a Parquet file or an Arrow folder, with the columns checked first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [text_field, *([domain_field] if domain_field else [])]
    if src.kind == "parquet":
        schema = pq.read_schema(src.path)
        check_columns(src, schema.names, columns)
        yield from pq.ParquetFile(src.path).iter_batches(batch_size=ROWS_PER_BATCH, columns=columns)
        return
    for path in sorted(src.path.glob("*.arrow")):  # datasets' save_to_disk: Arrow IPC streams
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        check_columns(src, reader.schema.names, columns)
        for batch in batches:
            yield batch.select(columns)


def check_columns(src: Source, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"input {src.path}: no column {missing[0]!r} (columns: {', '.join(names)}); pass --text-field "
                        f"/ --domain-field")
