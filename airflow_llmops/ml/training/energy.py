"""Energy and emissions of the training loop, measured by codecarbon in offline mode on rank 0.

Energy accounting is a report, not a requirement: any codecarbon failure turns into null values and a warning,
never into a failed training job.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnergyReading:
    energy_kwh: float | None
    emissions_kg: float | None


class EnergyMeter:
    """Wraps ``OfflineEmissionsTracker``: no network (offline carbon intensity by country), no CSV file."""

    def __init__(self) -> None:
        self._tracker: Any = None

    def start(self) -> None:
        try:
            from codecarbon import OfflineEmissionsTracker

            # codecarbon logs at INFO before its own log_level takes effect; keep the job log readable.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            tracker = OfflineEmissionsTracker(
                country_iso_code=os.environ.get("LLMOPS_COUNTRY_ISO", "USA"),
                log_level="error",
                save_to_file=False,
                # A lock file would stop a second job (or a retry whose first attempt was killed) on this host.
                allow_multiple_runs=True,
                project_name="airflow-llmops",
            )
            tracker.start()
            self._tracker = tracker
        except Exception as err:  # any failure in an optional measurement must not stop training
            warnings.warn(f"codecarbon could not start, energy is not recorded: {err}", stacklevel=2)
            self._tracker = None

    def stop(self) -> EnergyReading:
        if self._tracker is None:
            return EnergyReading(None, None)
        try:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
            return EnergyReading(float(data.energy_consumed), float(data.emissions))
        except Exception as err:  # see start()
            warnings.warn(f"codecarbon failed, energy is not recorded: {err}", stacklevel=2)
            return EnergyReading(None, None)
        finally:
            self._tracker = None
