"""pico-rm --config FILE --replica NAME: the Replication Module of one replica.

Runs the checkpoint epochs of every protected group of the replica (a group whose target is
another replica): suspend, drain, capture the modified flows, resume, INSTALL them on the
target's SMM, and commit on its ack so the PMM releases the group's output. It waits up to 30 s
for the replica's SMM and PMM segments. picoctl talks to it on rm_endpoint (groups created,
deleted, retargeted; flows listed and moved); Prometheus metrics on metrics_port + 2; a group
whose backup stops answering is unprotected and reported to control.controller_endpoint.
"""
from __future__ import annotations

import sys

from shared.cli import replica_main


def main(argv: list[str] | None = None) -> int:
    def run(config, replica):
        from rm.server import run
        return run(config, replica)
    return replica_main("pico-rm", __doc__, argv, run)


if __name__ == "__main__":
    sys.exit(main())
