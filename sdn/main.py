"""pico-sdn --config FILE [--order activate-first|reroute-first]: the cluster controller.

Steers every client flow to its replica through Faucet (sdn.placement, sdn.hosts), takes the
replicas' heartbeats and events on control.controller_endpoint, watches Faucet's event socket
for replica links going down, and fails a replica over in the order activate -> reroute ->
re-protect, and moves replicas in and out of the ring live (picoctl scale-in/scale-out).
--order reroute-first exists only to show that the other order breaks connections.
"""
from __future__ import annotations

import argparse
import sys

from shared import log as pico_log
from shared.config import DEFAULT_CONFIG, load_config
from shared.errors import PicoError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-sdn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="cluster YAML")
    ap.add_argument("--order", choices=["activate-first", "reroute-first"],
                    default="activate-first", help="failover order (default: the right one)")
    ap.add_argument("--activate-delay-ms", type=int, default=0,
                    help="testing only: delay each activation (a slow activation of many flows)")
    args = ap.parse_args(argv)
    pico_log.setup()
    try:
        config = load_config(args.config)
        from .server import run
        return run(config, args.order, args.activate_delay_ms / 1000.0)
    except (PicoError, OSError) as e:
        print(f"pico-sdn: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
