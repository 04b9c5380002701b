"""Entry points whose issue has not landed yet: they say so and exit 2."""
from __future__ import annotations

import sys


def not_implemented(name: str, issue: str) -> int:
    print(f"{name}: not implemented yet (arrives with the {issue} issue)", file=sys.stderr)
    return 2


def _entry(name: str, issue: str):
    def main(argv=None) -> int:
        return not_implemented(name, issue)
    return main


sdn_main = _entry("pico-sdn", "SDN")
