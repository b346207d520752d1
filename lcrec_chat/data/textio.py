"""Line-by-line reading of plain or gzipped text files, with errors that name the file and line.

Every loader reads through `iter_lines` so that a truncated .gz, bytes that are not UTF-8 or a
missing file all surface as one `DataError` naming the file (and the line where it broke), instead
of an EOFError deep inside gzip or a dataset that silently stops half way.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .dataset import DataError


def iter_lines(path: str | Path, progress: str | None = None) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its line ending) for a .gz or plain UTF-8 file.

    CRLF and LF endings both work. `progress` names a tqdm bar, shown on a
    terminal only, for files that take more than a couple of seconds.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    lineno = 0
    try:
        # Binary lines decoded one at a time, so a decoding error names its exact line.
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            lines = tqdm(handle, desc=progress, unit=" lines", disable=None if progress else True,
                         mininterval=1.0, leave=False)
            for lineno, raw in enumerate(lines, 1):
                line = raw.decode("utf-8").rstrip("\r\n")
                yield lineno, (line.lstrip("\ufeff") if lineno == 1 else line)  # drop a BOM
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: compressed file is truncated or corrupt after line {lineno}: {e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: line {lineno}: not valid UTF-8 text ({e.reason})") from e


def read_json(path: str | Path) -> object:
    """Load one JSON document (.json or .json.gz); a syntax error names the file, line and column."""
    path = Path(path)
    text = "\n".join(line for _, line in iter_lines(path))
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON ({e.msg}); "
                        "is the file truncated?") from e
