"""The expert-distribution record: per-layer, per-expert top-k selection counts -> CSV.

The counts live on the device (the model runner's histogram, added to inside
each step while recording is on); they reach the host only when a dump is
asked for, never per step.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np


def expert_csv_name(timestamp: float | None = None) -> str:
    """The reference's file name: `expert_distribution_rank0_timestamp<time>.csv`."""
    return f"expert_distribution_rank0_timestamp{timestamp if timestamp is not None else time.time()}.csv"


def write_expert_distribution(histogram: np.ndarray, directory: str | Path = ".") -> Path:
    """One row per layer and expert (zeros included), header `layer_id,expert_id,count`."""
    path = Path(directory) / expert_csv_name()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer_id", "expert_id", "count"])
        for layer, row in enumerate(np.asarray(histogram)):
            for expert, count in enumerate(row):
                writer.writerow([layer, expert, int(count)])
    return path
