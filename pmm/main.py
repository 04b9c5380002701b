"""pico-pmm --config FILE --replica NAME: the Packet Management Module of one replica.

Run it inside the replica's network namespace, as root, after the replica's pico-smm. It binds
the replica's NFQUEUE (queue number from the config), so the namespace's FORWARD chain must
send packets there (see sdn/testbed.py).
"""
from __future__ import annotations

import argparse
import sys

from shared import log as pico_log
from shared.config import DEFAULT_CONFIG, load_config
from shared.errors import PicoError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-pmm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="cluster YAML")
    ap.add_argument("--replica", required=True, help="this replica's name in the config")
    ap.add_argument("--audit", metavar="FILE",
                    help="append one JSON line per released packet (group, epoch tag, committed "
                         "epoch, buffering): the output-commit invariant checker reads it")
    args = ap.parse_args(argv)
    pico_log.setup()
    try:
        config = load_config(args.config)
        config.replica(args.replica)
        from pmm.server import run
        return run(config, args.replica, args.audit)
    except (PicoError, OSError) as e:
        print(f"pico-pmm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
