"""FairFace-style label CSV: ``file,age,gender,race,service_test`` (+ extra attribute columns)."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from facellm_edge.errors import InputError

REQUIRED_COLUMNS = ("file", "age", "gender", "race")
# Columns that are bookkeeping, not known attributes of the face.
NON_ATTRIBUTE_COLUMNS = frozenset({"file", "service_test"})
_AGE = re.compile(r"^(\d+-\d+|more than \d+|\d+)$")


@dataclass(frozen=True)
class FaceLabels:
    """One labelled image: its path relative to the images folder and its known attributes (column -> value)."""

    file: str
    attributes: tuple[tuple[str, str], ...]

    @property
    def attrs(self) -> dict[str, str]:
        return dict(self.attributes)


def read_labels(csv_path: Path) -> list[FaceLabels]:
    """Parse and validate a label CSV; every error names the row (1-based, header = row 1) and the column."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"label CSV {csv_path} does not exist: pass the FairFace label file with --labels")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(
                    f"label CSV {csv_path} lacks column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'});"
                    f" expected at least {','.join(REQUIRED_COLUMNS)}"
                )
            if len(set(header)) != len(header):
                raise InputError(f"label CSV {csv_path} has duplicate column names in its header: {','.join(header)}")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise InputError(f"label CSV {csv_path} is not UTF-8 text: {exc.reason}") from exc
    except csv.Error as exc:
        raise InputError(f"label CSV {csv_path} cannot be parsed: {exc}") from exc

    out: list[FaceLabels] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(rows, start=2):
        if None in raw:
            raise InputError(f"label CSV {csv_path} row {i} has more fields than the header ({len(header)} columns)")
        row = {k.strip(): (v or "").strip() for k, v in raw.items()}
        if all(not v for v in row.values()):
            continue  # blank line
        for col in header:
            if raw.get(col) is None:
                raise InputError(f"label CSV {csv_path} row {i} has fewer fields than the header: column '{col}' is missing")
        for col in REQUIRED_COLUMNS:
            if not row[col]:
                raise InputError(f"label CSV {csv_path} row {i}: column '{col}' is empty")
        file = Path(row["file"]).as_posix()  # "./a.jpg" and "a.jpg" are one image (one record id, one request)
        if Path(file).is_absolute() or ".." in Path(file).parts:
            raise InputError(f"label CSV {csv_path} row {i}: column 'file' must be a path relative to --images, got {file!r}")
        if not _AGE.match(row["age"]):
            raise InputError(
                f"label CSV {csv_path} row {i}: column 'age' must look like '20-29' or 'more than 70', got {row['age']!r}"
            )
        if file in seen:
            raise InputError(f"label CSV {csv_path} row {i}: file {file!r} already appears in row {seen[file]}")
        seen[file] = i
        attrs = tuple((c, row[c]) for c in header if c not in NON_ATTRIBUTE_COLUMNS and row[c])
        out.append(FaceLabels(file=file, attributes=attrs))
    if not out:
        raise InputError(f"label CSV {csv_path} has no data rows")
    return out


def check_images(labels: list[FaceLabels], images_dir: Path) -> None:
    """Fail before any request if an image listed in the CSV is missing."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"images folder {images_dir} does not exist: pass the FairFace image root with --images")
    missing = [lab.file for lab in labels if not (images_dir / lab.file).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(f"image {images_dir / missing[0]} listed in the label CSV does not exist{more}")
