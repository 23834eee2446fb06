"""Sharding plans for the models' embedding tables: constraints, planner, readable plan reports. No Ray."""

import logging

# TorchRec's planner warns on every plan that the Topology was built by hand and that dry-run dense
# estimates are approximate; both are expected here (we describe clusters, and plan offline) and
# would bury the report.
for _name in ("torchrec.distributed.planner.types", "torchrec.distributed.planner.storage_reservations"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class _DropDataParallelSpecNotice(logging.Filter):
    """The planner logs "Sharding spec not found" on the root logger for every data_parallel table,
    which by definition has no sharding spec."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Sharding spec not found" not in record.getMessage()


logging.getLogger().addFilter(_DropDataParallelSpecNotice())
