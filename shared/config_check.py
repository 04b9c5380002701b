"""`pico-check-config FILE [FILE...]`: validate cluster config files without starting anything.

Prints ``FILE: ok (N replicas, M groups)`` per valid file on stdout and the
located error (``file:line: key: reason``) per invalid file on stderr.
Exit status: 0 all ok, 1 any config error, 2 usage error (from argparse).
With security.curve on, the public keys are looked up too: a missing keys_dir or key file is
a warning on stderr, not an error (the file may be checked away from the replicas' hosts).
"""
from __future__ import annotations

import argparse
import sys

from shared.config import load_config
from shared.errors import ConfigError, SecurityError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pico-check-config",
                                     description="Validate Pico cluster config files.")
    parser.add_argument("files", nargs="+", metavar="FILE", help="cluster YAML file(s) to check")
    args = parser.parse_args(argv)
    rc = 0
    # Check every file even after a failure, so one run reports all broken files.
    for f in args.files:
        try:
            cfg = load_config(f)
        except ConfigError as e:
            print(e, file=sys.stderr)
            rc = 1
        else:
            print(f"{f}: ok ({len(cfg.replicas)} replicas, {len(cfg.groups)} groups"
                  f"{_curve_summary(cfg)})")
    return rc


def _curve_summary(cfg) -> str:
    if not cfg.security.curve:
        return ""
    from shared.security import authorized
    try:
        return f", curve: {len(authorized(cfg))} authorized key(s)"
    except (SecurityError, ConfigError) as e:
        print(f"{cfg.path}: warning: {e}", file=sys.stderr)
        return ", curve: keys not found here"


if __name__ == "__main__":
    sys.exit(main())
