"""Training metrics as JSON lines, with a per-epoch CSV and optional TensorBoard mirror.

``folder/metrics.jsonl`` is the record of truth: one JSON object per line, each with a ``"kind"``
(``"step"``, ``"epoch"``, ...) and the logged values, e.g. ``epoch``, ``step``, ``loss``, ``soft_acc``,
``hard_acc``, ``gap``, ``hard_flops_ratio``, ``target_flops``, ``lr``. ``folder/epochs.csv`` repeats the
``kind="epoch"`` rows for spreadsheets; it is always derivable from the JSON lines and is rebuilt from them
when a logger opens the folder. Its columns are ``epoch``, ``step``, ``phase`` first, then the other keys in
alphabetical order, so every run (single-process or data-parallel) writes the same header.

Every line is strict JSON: a non-finite number (NaN, +-infinity; a diverging loss, a metric a phase does not
compute) is written as ``null`` and :func:`read_metrics` gives it back as ``float("nan")``, so the record is
kept and any JSON reader can parse the file.
"""
from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = ["MetricsLogger", "read_metrics", "METRICS_FILE", "EPOCHS_FILE", "CSV_LEADING"]

METRICS_FILE = "metrics.jsonl"
EPOCHS_FILE = "epochs.csv"
CSV_LEADING = ("epoch", "step", "phase")  # the first columns of epochs.csv; the others follow sorted


def _metrics_file(folder_or_file: os.PathLike | str) -> Path:
    path = Path(folder_or_file)
    return path / METRICS_FILE if path.is_dir() or path.suffix != ".jsonl" else path


def read_metrics(folder: os.PathLike | str, kind: str | None = None) -> list[dict]:
    """All records of ``folder/metrics.jsonl`` in logging order (only those of ``kind`` if given).

    ``folder`` may also be the ``.jsonl`` file itself. A missing file gives ``[]``. A line that is not a
    JSON object (typically the last line of a run killed mid-write) is skipped with a warning. A ``null``
    value (how a non-finite number is written) is returned as ``float("nan")``.
    """
    path = _metrics_file(folder)
    records, _ = _read_records(path)
    return [{k: math.nan if v is None else v for k, v in r.items()} for r in records
            if kind is None or r.get("kind") == kind]


def _read_records(path: Path) -> tuple[list[dict], bool]:
    """(records, clean): ``clean`` is False when a malformed or unterminated line was skipped."""
    if not path.is_file():
        return [], True
    records: list[dict] = []
    clean = True
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not line.endswith("\n"):
                clean = False
                warnings.warn(f"{path}:{number}: skipping a malformed metrics line", RuntimeWarning, stacklevel=3)
                continue
            records.append(record)
    return records, clean


def _plain(value: Any) -> Any:
    """Turn tensors and numpy scalars/arrays into JSON-ready Python values; non-finite floats become None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return _plain(value.item() if value.numel() == 1 else value.tolist())
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar or array, without importing numpy
        return _plain(value.item() if getattr(value, "size", 1) == 1 else value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _process_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    # torchrun exports RANK before the process group exists; logging may start that early.
    return int(os.environ.get("RANK", "0"))


def _open_tensorboard(folder: Path, purge_step: int | None) -> Any:
    """A SummaryWriter under ``folder/tensorboard``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # ImportError, or a broken tensorboard install: mirroring is optional output only
        return None
    return SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=purge_step)


class MetricsLogger:
    """Append metric records to ``folder/metrics.jsonl`` and mirror epoch rows to ``folder/epochs.csv``.

    Args:
        folder: run folder (created if missing).
        rank0_only: in a distributed job, only rank 0 writes; other ranks' :meth:`log` does nothing.
            With False every process writes, so give each process its own folder.
        resume_step: when resuming from a checkpoint taken at this step, records logged after it by the
            interrupted run are removed first, so re-running those steps does not duplicate rows. Removed
            are all records with ``step > resume_step`` and any record without a step that was logged after
            the first of those.
        pending_epoch: the checkpoint was taken at the end of an epoch's training, before its evaluation: the
            ``kind="epoch"`` record of ``resume_step`` (which the resumed run logs again) is removed too.
        tensorboard: also write scalars to ``folder/tensorboard`` when tensorboard is importable
            (silently off otherwise).

    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, folder: os.PathLike | str, rank0_only: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, pending_epoch: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / METRICS_FILE
        self.csv_path = self.folder / EPOCHS_FILE
        self.enabled = not rank0_only or _process_rank() == 0
        self._file = None
        self._tb = None
        self._epoch_rows: list[dict] = []
        self._columns: list[str] = []
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        records, clean = _read_records(self.path)
        if resume_step is not None:
            kept = _drop_after(records, resume_step, pending_epoch)
        else:
            kept = records
        if len(kept) != len(records) or not clean:
            # Rewrite atomically: a crash here must not lose the records that are kept.
            _write_lines(self.path, kept)
        for record in kept:
            if record.get("kind") == "epoch":
                self._add_epoch_row(record)
        self._rewrite_csv()
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _open_tensorboard(self.folder, None if resume_step is None else resume_step + 1)

    # ------------------------------------------------------------------ logging

    def log(self, kind: str, **values: Any) -> dict | None:
        """Append one record ``{"kind": kind, **values}``; return it (None on a non-writing rank).

        Tensors and numpy values are converted to Python numbers / lists.
        """
        if not self.enabled:
            return None
        if self._file is None:
            raise RuntimeError(f"MetricsLogger for {str(self.folder)!r} is closed")
        if "kind" in values:
            raise TypeError("'kind' is given positionally; it cannot also be a value")
        record = {"kind": str(kind), **{k: _plain(v) for k, v in values.items()}}
        self._file.write(_json_line(record))
        self._file.flush()  # a crash loses at most the line being written
        if kind == "epoch":
            if self._add_epoch_row(record):
                self._rewrite_csv()
            else:
                self._append_csv(self._epoch_rows[-1])
        if self._tb is not None:
            self._mirror_tensorboard(record)
        return record

    def close(self) -> None:
        """Flush and close the files; further :meth:`log` calls raise."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ epoch CSV

    def _add_epoch_row(self, record: dict) -> bool:
        """Remember an epoch row; True when it brings columns the CSV header lacks (the header is then
        :data:`CSV_LEADING` columns first, the others sorted)."""
        row = {k: v for k, v in record.items() if k != "kind"}
        self._epoch_rows.append(row)
        if set(row) <= set(self._columns):
            return False
        names = set(self._columns) | set(row)
        self._columns = [k for k in CSV_LEADING if k in names] + sorted(names - set(CSV_LEADING))
        return True

    def _rewrite_csv(self) -> None:
        if not self._epoch_rows:
            if self.csv_path.exists():
                self.csv_path.unlink()
            return
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(_csv_row(r) for r in self._epoch_rows)
        os.replace(tmp, self.csv_path)

    def _append_csv(self, row: dict) -> None:
        with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns).writerow(_csv_row(row))

    # ------------------------------------------------------------------ TensorBoard

    def _mirror_tensorboard(self, record: dict) -> None:
        kind = record["kind"]
        x = record.get("step", record.get("epoch"))
        for key, value in record.items():
            if key in ("kind", "step", "epoch") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self._tb.add_scalar(f"{kind}/{key}", value, global_step=x)


def _json_line(record: dict) -> str:
    """``record`` as one line of strict JSON (a NaN read from an older file becomes null)."""
    return json.dumps(_plain(record), allow_nan=False) + "\n"


def _csv_row(row: dict) -> dict:
    # Lists and dicts do not fit a CSV cell as-is; JSON keeps them readable and parseable.
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()}


def _drop_after(records: list[dict], resume_step: int, pending_epoch: bool = False) -> list[dict]:
    kept, cut = [], False
    for record in records:
        step = record.get("step")
        numeric = isinstance(step, (int, float)) and not isinstance(step, bool)
        if numeric and (step > resume_step or (pending_epoch and step == resume_step
                                                and record.get("kind") == "epoch")):
            cut = True
            continue
        if cut and not isinstance(step, (int, float)):
            continue
        kept.append(record)
    return kept


def _write_lines(path: Path, records: Iterable[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(_json_line(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
