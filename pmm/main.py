"""pico-pmm --config FILE --replica NAME: the Packet Management Module of one replica.

Run it inside the replica's network namespace, as root, after the replica's pico-smm. It binds
the replica's NFQUEUE (queue number from the config), so the namespace's FORWARD chain must
send packets there (see sdn/testbed.py).
"""
from __future__ import annotations

import sys

from shared.cli import replica_main


def _options(ap) -> None:
    ap.add_argument("--audit", metavar="FILE",
                    help="append one JSON line per released packet (group, epoch tag, committed "
                         "epoch, buffering): the output-commit invariant checker reads it")


def main(argv: list[str] | None = None) -> int:
    def run(config, replica, audit=None):
        from pmm.server import run
        return run(config, replica, audit)
    return replica_main("pico-pmm", __doc__, argv, run, _options)


if __name__ == "__main__":
    sys.exit(main())
