"""Latency: targets, the measurement protocol, lookup tables and their validation.

Typical use::

    from nas.latency import LatencyTable
    table = LatencyTable.load("latency_tables/mnasnet-r32-cpu-t1-b1.json", expect_target="cpu", expect_threads=1)
    ms = table.predict(arch)
"""

from nas.latency.measure import Measurement, Protocol, measure_archs, measure_models, measure_onnx, measurement_lock, training_lock
from nas.latency.table import LatencyTable, MissingEntryError, TableMismatchWarning, default_table_path
from nas.latency.targets import PROVIDERS, Target, get_target

__all__ = [
    "LatencyTable", "Measurement", "MissingEntryError", "PROVIDERS", "Protocol", "TableMismatchWarning", "Target",
    "default_table_path", "get_target", "measure_archs", "measure_models", "measure_onnx", "measurement_lock",
    "training_lock",
]
