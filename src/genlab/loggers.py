"""Loggers for ``conf/logger/``: Lightning's, where they keep a resumed run's history."""

from __future__ import annotations

import csv
import io
import os

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, continuing the ``metrics.csv`` a resumed run already has. Lightning's
    writer deletes that file when it is made (every process starts a new one), so a resumed run
    would lose every row before the resume; here the rows are kept and the new ones appended."""

    @property
    def experiment(self):
        if self._experiment is not None or rank_zero_only.rank != 0:  # other ranks write nothing
            return super().experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        previous = ""
        if os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:  # closed before Lightning's writer replaces it
                previous = f.read()
        writer = super().experiment
        if previous:
            with open(path, "w", newline="", encoding="utf-8") as f:
                f.write(previous)
            writer.metrics_keys = list(csv.DictReader(io.StringIO(previous)).fieldnames or [])
        return writer
