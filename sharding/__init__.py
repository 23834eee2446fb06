"""Sharding plans for the models' embedding tables: constraints, planner, readable plan reports. No Ray."""

import logging

# TorchRec's planner warns on every plan that the Topology was built by hand and that dry-run dense
# estimates are approximate; both are expected here (we describe clusters, and plan offline) and
# would bury the report.
for _name in ("torchrec.distributed.planner.types", "torchrec.distributed.planner.storage_reservations"):
    logging.getLogger(_name).setLevel(logging.ERROR)
