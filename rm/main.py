"""pico-rm --config FILE --replica NAME: the Replication Module of one replica (first cut).

Runs the checkpoint epochs of every protected group of the replica (a group with a target in
the config): suspend, drain, capture the modified flows, resume, INSTALL them on the target's
SMM, and commit on its ack so the PMM releases the group's output. Start it after the replica's
pico-smm and pico-pmm. Runtime group changes, picoctl, metrics and pipelined sends come with the
rest of the RM issue.
"""
from __future__ import annotations

import argparse
import sys

from shared import log as pico_log
from shared.config import DEFAULT_CONFIG, load_config
from shared.errors import PicoError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-rm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="cluster YAML")
    ap.add_argument("--replica", required=True, help="this replica's name in the config")
    args = ap.parse_args(argv)
    pico_log.setup()
    try:
        config = load_config(args.config)
        config.replica(args.replica)
        from rm.server import run
        return run(config, args.replica)
    except (PicoError, OSError) as e:
        print(f"pico-rm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
