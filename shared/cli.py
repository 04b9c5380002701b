"""The command line every replica process shares: --config FILE --replica NAME, then run."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from . import log as pico_log
from .config import DEFAULT_CONFIG, load_config
from .errors import PicoError


def replica_main(prog: str, doc: str, argv: list[str] | None,
                 run: Callable[..., int],
                 extra: Callable[[argparse.ArgumentParser], None] | None = None,
                 ) -> int:
    """Parse the common options (plus `extra`'s), load and check the config, call
    run(config, replica, **extra options). Config and OS errors become one clear line, exit 1."""
    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="cluster YAML")
    ap.add_argument("--replica", required=True, help="this replica's name in the config")
    if extra:
        extra(ap)
    args = vars(ap.parse_args(argv))
    pico_log.setup()
    try:
        config = load_config(args.pop("config"))
        replica = args.pop("replica")
        config.replica(replica)
        return run(config, replica, **args)
    except (PicoError, OSError) as e:  # OSError: e.g. an endpoint already taken
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
