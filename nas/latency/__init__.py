"""Latency: targets, the measurement protocol, lookup tables and their validation.

Typical use::

    from nas.latency import LatencyTable
    table = LatencyTable.load("latency_tables/mnasnet-r32-cpu-t1-b1.json", expect_target="cpu", expect_threads=1)
    ms = table.predict(arch)

Names are imported on first use: predicting from a table needs neither torch nor the measurement
code, and importing torch takes seconds.
"""

import importlib

_EXPORTS = {
    "BusyMonitor": "measure", "Measurement": "measure", "Protocol": "measure", "measure_archs": "measure",
    "measure_models": "measure", "measure_onnx": "measure", "measurement_lock": "measure",
    "training_lock": "measure",
    "LatencyTable": "table", "MissingEntryError": "table", "TableMismatchWarning": "table",
    "default_table_path": "table",
    "PROVIDERS": "targets", "Target": "targets", "get_target": "targets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nas.latency' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nas.latency.{_EXPORTS[name]}"), name)
