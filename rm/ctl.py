"""picoctl: operate a replica's RM over ZeroMQ.

    picoctl [--config FILE] (--replica NAME | --endpoint URL) [--json] [--timeout MS] COMMAND
      groups | stats                 the replica's groups: frequency configured and achieved,
                                     commit latency p50/p99, held output, last acked epoch...
      suspend G | resume G           hold or release group G's input
      group set G [--frequency HZ] [--buffering on|off]

Runtime group create/delete, flows and move come with the rest of the RM issue.
"""
from __future__ import annotations

import argparse
import json
import sys

from shared import wire
from shared.config import DEFAULT_CONFIG, load_config
from shared.control import ControlClient
from shared.errors import ControlTimeout, PicoError, WireError

COLUMNS = [("id", "group"), ("protected", "prot"), ("configured_hz", "cfg Hz"),
           ("achieved_hz", "got Hz"), ("commit_p50_ms", "p50 ms"), ("commit_p99_ms", "p99 ms"),
           ("held", "held"), ("committed", "acked"), ("epoch", "epoch"), ("suspended", "susp"),
           ("buffering", "buf"), ("bytes_last", "bytes"), ("retries", "retries")]


def table(groups: list[dict]) -> str:
    rows = [[h for _, h in COLUMNS]]
    for g in groups:
        rows.append(["" if g.get(k) is None else str(g.get(k, "")) for k, _ in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="picoctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--replica", help="replica name in the config (uses its rm_endpoint)")
    where.add_argument("--endpoint", help="the RM's endpoint, e.g. tcp://127.0.0.1:7201")
    ap.add_argument("--json", action="store_true", help="print the reply as JSON")
    ap.add_argument("--timeout", type=int, default=2000, help="milliseconds to wait")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("groups")
    sub.add_parser("stats")
    for name in ("suspend", "resume"):
        sub.add_parser(name).add_argument("group", type=int)
    gset = sub.add_parser("group").add_subparsers(dest="gcmd", required=True).add_parser("set")
    gset.add_argument("group", type=int)
    gset.add_argument("--frequency", type=int)
    gset.add_argument("--buffering", choices=["on", "off"])
    args = ap.parse_args(argv)

    try:
        endpoint = args.endpoint
        if endpoint is None:
            rep = load_config(args.config).replica(args.replica)
            if not rep.rm_endpoint:
                print(f"picoctl: replica {rep.name} has no rm_endpoint in {args.config}",
                      file=sys.stderr)
                return 2
            endpoint = rep.rm_endpoint
        if args.cmd in ("groups", "stats"):
            type_, body = wire.STATS, {}
        elif args.cmd in ("suspend", "resume"):
            type_ = wire.SUSPEND if args.cmd == "suspend" else wire.RESUME
            body = {"group": args.group}
        else:
            type_, body = wire.GROUP_SET, {"group": args.group}
            if args.frequency is not None:
                body["frequency_hz"] = args.frequency
            if args.buffering is not None:
                body["buffering"] = args.buffering == "on"
        with ControlClient(endpoint, timeout_ms=args.timeout) as c:
            reply = json.loads(c.request(type_, wire.json_body(body)).body)
    except ControlTimeout as e:
        print(f"picoctl: {e}", file=sys.stderr)
        return 3
    except (WireError, PicoError) as e:
        print(f"picoctl: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    elif args.cmd in ("groups", "stats"):
        print(table(reply["groups"]))
    else:
        print(" ".join(f"{k}={v}" for k, v in reply.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
