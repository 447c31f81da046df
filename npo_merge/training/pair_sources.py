"""Preference-pair sources: captions and labels read up front, the two images of a row on demand.

* Pick-a-Pic schema (caption, jpg_0, jpg_1, label_0; jpg_* are encoded image bytes) from local
  parquet files or from the .arrow files of a local `datasets` cache / `save_to_disk` folder. Both
  are read with pyarrow alone (no `datasets` import): captions and labels up front, image bytes
  lazily per row (parquet: one row group at a time, a few kept; arrow: memory-mapped).
* JSONL: {"caption", "image_0", "image_1", "label_0"} or {"caption", "winner", "loser"}, image
  paths relative to the JSONL file.

label_0 follows Pick-a-Pic: 1 = jpg_0 preferred, 0 = jpg_1 preferred, 0.5 = tie. A source only
reports labels; orienting pairs and the tie policy are `PairDataset`'s job.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from npo_merge.errors import FormatError, InputError, NpoMergeError

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
_COMMON_SPLITS = {"train", "test", "validation", "valid", "val", "dev"}


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise NpoMergeError(
            "reading parquet/arrow preference data needs pyarrow: pip install 'npo-merge[train]'"
        ) from None
    return pyarrow



class _TableImages:
    """Lazy jpg_0/jpg_1 access over parquet or arrow files; picklable (handles reopen in each worker)."""

    def __init__(self, files: Sequence[Path], row_counts: Sequence[int], cached_groups: int = 2):
        self.files = list(files)
        self.starts = np.cumsum([0, *row_counts])
        self.cached_groups = cached_groups
        self._open: dict[int, Any] = {}
        self._groups: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}, "_groups": OrderedDict()}

    def block_ids(self) -> np.ndarray:
        """Per row, the id of the parquet row group holding it (arrow rows, cheap to reach, get one id each)."""
        ids, next_id = [], 0
        for f, path in enumerate(self.files):
            n = int(self.starts[f + 1] - self.starts[f])
            if path.suffix == ".arrow":
                ids.append(np.arange(next_id, next_id + n))
                next_id += n
                continue
            meta = _pyarrow().parquet.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                ids.append(np.full(meta.row_group(g).num_rows, next_id))
                next_id += 1
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def locate(self, row: int) -> tuple[int, int]:
        """(file number, row within that file)."""
        f = int(np.searchsorted(self.starts, row, side="right")) - 1
        return f, row - int(self.starts[f])

    def get(self, row: int, column: str) -> bytes:
        f, local = self.locate(row)
        if self.files[f].suffix == ".arrow":
            if f not in self._open:
                self._open[f] = _read_arrow(self.files[f])
            value = self._open[f].column(column)[local].as_py()
        else:
            value = self._parquet_value(f, local, column)
        if isinstance(value, dict):  # a `datasets` Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or (Path(value["path"]).read_bytes() if value.get("path") else None)
        if not value:
            raise InputError(f"{self.files[f].name} row {local}: {column} holds no image bytes")
        return value

    def _parquet_value(self, f: int, local: int, column: str) -> Any:
        if f not in self._open:
            pf = _pyarrow().parquet.ParquetFile(self.files[f])
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._open[f] = (pf, np.cumsum([0, *sizes]))
        pf, group_starts = self._open[f]
        group = int(np.searchsorted(group_starts, local, side="right")) - 1
        table = self._groups.get((f, group))
        if table is None:
            table = self._groups[(f, group)] = pf.read_row_group(group, columns=["jpg_0", "jpg_1"])
            while len(self._groups) > self.cached_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end((f, group))
        return table.column(column)[local - int(group_starts[group])].as_py()


def _read_arrow(path: Path) -> Any:
    """A memory-mapped table from an Arrow IPC file: stream format (`datasets`) or file format."""
    pa = _pyarrow()
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def _split_tokens(path: Path, root: Path) -> set[str]:
    tokens = set(path.stem.split("-"))
    tokens.update(p.name for p in path.relative_to(root).parents if p.name)
    return tokens


def pickapic_files(path: str | os.PathLike[str], split: str | None = None) -> list[Path]:
    """The parquet/arrow files of a Pick-a-Pic-schema data set: one file, or every such file under a folder.

    A folder holding several splits (file or folder names such as train-00000-of-00014.parquet,
    pickapic_v2-test-00000-of-00001.arrow, train/data-00000-of-00001.arrow) needs `split`.
    `datasets` cache files written by .map() (cache-*.arrow) are ignored.
    """
    root = Path(path)
    if root.is_file():
        if root.suffix not in (".parquet", ".arrow"):
            raise InputError(f"{root}: expected a .parquet or .arrow file (Pick-a-Pic schema)")
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such file or folder")
    files = sorted(
        p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow") and not p.name.startswith("cache-")
    )
    if not files:
        raise InputError(f"{root}: no .parquet or .arrow files found")
    if split is not None:
        chosen = [p for p in files if split in _split_tokens(p, root)]
        if not chosen:
            raise InputError(f"{root}: no files of split {split!r}")
        return chosen
    found = sorted(set().union(*(_split_tokens(p, root) for p in files)) & _COMMON_SPLITS)
    if len(found) > 1:
        raise InputError(f"{root} holds several splits ({', '.join(found)}): choose one with split=")
    return files


class PairSource:
    """Captions and labels of a preference data set, with per-row access to its two images."""

    name: str
    captions: list[str]
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, row: int, which: int) -> bytes | Path:
        """The encoded bytes (or file path) of jpg_0 (which=0) or jpg_1 (which=1) of `row`."""
        raise NotImplementedError

    def where(self, row: int) -> str:
        """Where `row` comes from, for error messages ("train-0.parquet row 17")."""
        raise NotImplementedError

    def block_ids(self) -> np.ndarray:
        """Per row, a storage block id: rows sharing one are cheap to read together (see `blockwise_order`)."""
        return np.arange(len(self))


class _TablePairs(PairSource):
    def __init__(self, name: str, captions: list[str], labels: list[Any], images: _TableImages):
        self.name, self.captions, self.labels, self._images = name, captions, labels, images

    def image(self, row: int, which: int) -> bytes:
        return self._images.get(row, f"jpg_{which}")

    def block_ids(self) -> np.ndarray:
        return self._images.block_ids()

    def where(self, row: int) -> str:
        f, local = self._images.locate(row)
        return f"{self._images.files[f].name} row {local}"


class _FilePairs(PairSource):
    def __init__(self, name: str, captions: list[str], labels: list[Any], paths: list[tuple[Path, Path]], wheres: list[str]):
        self.name, self.captions, self.labels, self._paths, self._wheres = name, captions, labels, paths, wheres

    def image(self, row: int, which: int) -> Path:
        return self._paths[row][which]

    def where(self, row: int) -> str:
        return self._wheres[row]


def open_pickapic(path: str | os.PathLike[str], split: str | None = None) -> PairSource:
    """Open local Pick-a-Pic-schema data: a parquet/arrow file or a folder of them (hub snapshot, `datasets` cache)."""
    pa = _pyarrow()
    files = pickapic_files(path, split)
    captions: list[str] = []
    labels: list[Any] = []
    counts: list[int] = []
    for f in files:
        try:
            table = _read_arrow(f) if f.suffix == ".arrow" else None
            names = table.column_names if table is not None else pa.parquet.read_schema(f).names
            missing = [c for c in PICKAPIC_COLUMNS if c not in names]
            if missing:
                raise InputError(
                    f"{f}: missing column(s) {', '.join(missing)}; Pick-a-Pic data needs {', '.join(PICKAPIC_COLUMNS)}"
                )
            if table is None:
                table = pa.parquet.read_table(f, columns=["caption", "label_0"])
        except (pa.ArrowException, OSError) as exc:
            raise FormatError(f"{f}: not a readable {f.suffix[1:]} file ({exc})") from None
        captions.extend("" if c is None else str(c) for c in table.column("caption").to_pylist())
        labels.extend(table.column("label_0").to_pylist())
        counts.append(table.num_rows)
    return _TablePairs(str(path), captions, labels, _TableImages(files, counts))


def open_pair_jsonl(path: str | os.PathLike[str]) -> PairSource:
    """Open a JSONL file of pairs: {"caption", "image_0", "image_1", "label_0"} or {"caption", "winner", "loser"}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    captions, labels, pairs, wheres = [], [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object")
        if "winner" in rec or "loser" in rec:
            keys, label = ("caption", "winner", "loser"), 1.0
        else:
            keys, label = ("caption", "image_0", "image_1", "label_0"), rec.get("label_0")
        missing = [k for k in keys if k not in rec]
        if missing:
            raise InputError(
                f"{where}: missing field(s) {', '.join(missing)}; each line needs caption, image_0, image_1,"
                " label_0 (or caption, winner, loser)"
            )
        captions.append(str(rec["caption"]))
        labels.append(label)
        pairs.append((path.parent / str(rec[keys[1]]), path.parent / str(rec[keys[2]])))
        wheres.append(where)
    return _FilePairs(str(path), captions, labels, pairs, wheres)
