"""torchrun with its rendezvous store listening on the rendezvous address only.

    python -m trainers.torchrun --nproc-per-node 2 -m trainers --config launcher/configs/ncf_ml100k.toml

The same arguments as `torchrun`. torchrun's agent on the first node serves a TCPStore that every
rank and agent uses, and torch creates it listening on every interface of the machine (it takes no
bind address): anyone who can reach the machine could write keys into the job's store. Here each
store this process serves is handed a socket bound to the address it is served at (127.0.0.1 for
`--master-addr 127.0.0.1` or `--standalone`; node 0's cluster address across hosts). The ranks
themselves are unchanged (`python -m trainers`).
"""

from __future__ import annotations

import sys

from torch.distributed import run

from trainers.distributed import BoundTCPStore
from upstream.torch_private import launcher_stores_bound_to


def main(argv: list[str] | None = None) -> None:
    launcher_stores_bound_to(BoundTCPStore)
    run.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
