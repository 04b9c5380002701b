"""pico-smm --config FILE --replica NAME: the State Management Module of one replica."""
from __future__ import annotations

import sys

from shared.cli import replica_main


def main(argv: list[str] | None = None) -> int:
    def run(config, replica):
        from smm.server import run
        return run(config, replica)
    return replica_main("pico-smm", __doc__, argv, run)


if __name__ == "__main__":
    sys.exit(main())
