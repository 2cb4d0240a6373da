"""Per-image attribute labels for computing latent directions: CelebA's ``list_attr_celeba.txt``
and CSV files ``filename,attr1,attr2,...``, read into an :class:`AttributeTable`."""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["AttributeTable", "parse_attribute_file", "parse_attribute_csv", "parse_celeba_attributes",
           "table_image_paths"]


@dataclass(frozen=True)
class AttributeTable:
    """Per-image binary attributes: ``values [N, A]`` int8 in {+1, -1, 0 (unknown)}."""

    filenames: tuple[str, ...]
    names: tuple[str, ...]
    values: torch.Tensor

    def __len__(self) -> int:
        return len(self.filenames)

    def select(self, names: Sequence[str] | None) -> "AttributeTable":
        """Only the columns ``names`` (all when None), in that order."""
        if not names:
            return self
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"unknown attributes {missing}; the file has {', '.join(self.names)}")
        idx = [self.names.index(n) for n in names]
        return AttributeTable(self.filenames, tuple(names), self.values[:, idx])

    def head(self, limit: int | None) -> "AttributeTable":
        if limit is None:
            return self
        return AttributeTable(self.filenames[:limit], self.names, self.values[:limit])


def _check_names(names: list[str], where: str) -> None:
    if not names:
        raise ValueError(f"{where}: no attribute names")
    if any(not n for n in names):
        raise ValueError(f"{where}: empty attribute name in {names}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: duplicate attribute names {dupes}")


def _check_filenames(filenames: list[str], path) -> None:
    seen = set()
    for f in filenames:
        if f in seen:
            raise ValueError(f"{path}: filename {f!r} appears more than once")
        seen.add(f)


def parse_celeba_attributes(path) -> AttributeTable:
    """Read CelebA's ``list_attr_celeba.txt``: a line with the image count N, a line of A attribute
    names, then N lines ``filename v1 ... vA`` with each v in {1, -1}, whitespace separated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute file not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text file ({e})") from e
    lines = [ln for ln in lines if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path}: expected a count line and a header line of attribute names, "
                         f"got {len(lines)} non-empty line(s)")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"{path}, line 1: expected the number of images (an integer), "
                         f"got {lines[0].strip()[:60]!r}") from None
    names = lines[1].split()
    _check_names(names, f"{path}, line 2")
    rows = lines[2:]
    if len(rows) != declared:
        raise ValueError(f"{path}: line 1 declares {declared} images but {len(rows)} rows follow")
    filenames, values = [], []
    for lineno, line in enumerate(rows, start=3):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}, line {lineno}: expected a filename and {len(names)} values, "
                             f"got {len(parts)} fields")
        try:
            row = [int(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{path}, line {lineno}: values must be 1 or -1, got {parts[1:]}") from None
        if any(v not in (1, -1) for v in row):
            raise ValueError(f"{path}, line {lineno}: values must be 1 or -1, got {sorted(set(row))}")
        filenames.append(parts[0])
        values.append(row)
    _check_filenames(filenames, path)
    return AttributeTable(tuple(filenames), tuple(names),
                          torch.tensor(values, dtype=torch.int8).reshape(len(filenames), len(names)))


_TRUE = {"1", "+1", "true", "yes", "y", "t"}
_FALSE = {"0", "-1", "false", "no", "n", "f"}


def parse_attribute_csv(path) -> AttributeTable:
    """Read a CSV ``filename,attr1,attr2,...`` (a header row, then one row per image).

    A value is true (1, +1, true, yes), false (0, -1, false, no) or empty (unknown: the image is left
    out of that attribute's means).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute file not found: {path}")
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)  # line numbers as the file counts them, blank lines included
            rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from e
    if not rows:
        raise ValueError(f"{path}: empty; expected a header row 'filename,attr1,attr2,...'")
    header_line, header_row = rows[0]
    header = [c.strip() for c in header_row]
    if len(header) < 2:
        raise ValueError(f"{path}, line {header_line}: expected a header 'filename,attr1,...' with at least one "
                         f"attribute column, got {header_row}")
    names = header[1:]
    _check_names(names, f"{path}, line {header_line}")
    if len(rows) < 2:
        raise ValueError(f"{path}: a header but no image rows")
    filenames, values = [], []
    for lineno, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{path}, line {lineno}: expected {len(header)} columns like the header, "
                             f"got {len(row)}")
        filename = row[0].strip()
        if not filename:
            raise ValueError(f"{path}, line {lineno}: empty filename")
        parsed = []
        for name, cell in zip(names, row[1:]):
            v = cell.strip().lower()
            if v in _TRUE:
                parsed.append(1)
            elif v in _FALSE:
                parsed.append(-1)
            elif v == "":
                parsed.append(0)
            else:
                raise ValueError(f"{path}, line {lineno}, column {name!r}: expected 1/0, 1/-1, true/false, "
                                 f"yes/no or empty, got {cell!r}")
        filenames.append(filename)
        values.append(parsed)
    _check_filenames(filenames, path)
    return AttributeTable(tuple(filenames), tuple(names), torch.tensor(values, dtype=torch.int8))


def parse_attribute_file(path) -> AttributeTable:
    """:func:`parse_attribute_csv` for ``.csv`` files, :func:`parse_celeba_attributes` otherwise."""
    return (parse_attribute_csv if Path(path).suffix.lower() == ".csv" else parse_celeba_attributes)(path)


def table_image_paths(table: AttributeTable, image_dir) -> list[Path]:
    """The image path of every row, checked to lie inside ``image_dir`` and to exist (the first
    missing ones are named)."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    root = image_dir.resolve()
    paths = [image_dir / f for f in table.filenames]
    outside = [f for f, p in zip(table.filenames, paths) if not p.resolve().is_relative_to(root)]
    if outside:  # "../../etc/passwd" or an absolute path: the table names images of this folder only
        raise ValueError(f"{len(outside)} row(s) of the attribute file name files outside {image_dir}: "
                         f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}; expected paths relative to "
                         "the image folder, inside it")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in the attribute file are not in "
                                f"{image_dir}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return paths
