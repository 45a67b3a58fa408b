"""Latency: targets, the measurement protocol, lookup tables, their calibration, adaptation to this
machine and validation.

Typical use::

    from nas.latency import LatencyTable
    from nas.latency import get_target, table_for_machine
    table, provenance = table_for_machine(space, get_target("cpu"), resolution=32, num_classes=10)
    ms = table.predict(arch)    # predicted end-to-end ms on this machine

Names are imported on first use: predicting from a table needs neither torch nor the measurement
code, and importing torch takes seconds.
"""

import importlib

_EXPORTS = {
    "BusyMonitor": "measure", "Measurement": "measure", "Protocol": "measure", "measure_archs": "measure",
    "measure_models": "measure", "measure_onnx": "measure", "measurement_lock": "measure",
    "training_lock": "measure",
    "LatencyTable": "table", "MissingEntryError": "table", "default_table_path": "table",
    "Calibration": "calibration",
    "TableProvenance": "machine", "adapt_table": "machine", "cache_dir": "machine", "fastest_reachable_ms": "machine",
    "machine_check": "machine", "table_for_machine": "machine",
    "PROVIDERS": "targets", "Target": "targets", "get_target": "targets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nas.latency' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nas.latency.{_EXPORTS[name]}"), name)
