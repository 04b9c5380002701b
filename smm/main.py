"""pico-smm --config FILE --replica NAME: the State Management Module of one replica."""
from __future__ import annotations

import argparse
import sys

from shared import log as pico_log
from shared.config import DEFAULT_CONFIG, load_config
from shared.errors import PicoError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pico-smm", description=__doc__)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="cluster YAML")
    ap.add_argument("--replica", required=True, help="this replica's name in the config")
    args = ap.parse_args(argv)
    pico_log.setup()
    try:
        config = load_config(args.config)
        config.replica(args.replica)
        from smm.server import run
        return run(config, args.replica)
    except PicoError as e:
        print(f"pico-smm: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. the control endpoint is taken
        print(f"pico-smm: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
