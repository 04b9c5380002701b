"""picoctl: operate a replica's RM over ZeroMQ.

    picoctl [--config FILE] [--replica NAME | --endpoint URL] [--json] [--timeout MS] COMMAND
      groups | stats                 the replica's groups: frequency configured and achieved,
                                     commit latency p50/p99, held output, last acked epoch...
      suspend G | resume G           hold or release group G's input
      group create G [--frequency HZ] [--target R|none] [--buffering on|off]
      group delete G                 its flows join the default group (unprotected)
      group set G [--frequency HZ] [--target R|none] [--buffering on|off]
      flows [--group G] [--limit N]  the replica's active flows
      move FLOW G                    FLOW: 'tcp 10.0.0.1:1234 10.0.0.2:80' or a hex key
      scale-in R | scale-out R       (to pico-sdn, control.controller_endpoint) remove a
                                     replica from the ring, or add one: its flows move live
      keygen DIR NAME... [--force]   write CurveZMQ key pairs DIR/NAME.key (public) and
                                     DIR/NAME.key_secret (mode 0600); print the public keys

With security.curve on, picoctl connects with the key pair `operator` of security.keys_dir
(--key NAME, or --key PATH of a .key_secret file, for another one).

Exit status: 0 done, 1 refused (the message says why; a refused key too), 2 usage, 3 the
replica did not answer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shared import wire
from shared.config import DEFAULT_CONFIG, load_config
from shared.control import ControlClient
from shared.errors import AuthRefused, ControlTimeout, PicoError, WireError
from shared.flowkey import KEY_SIZE, parse_key_spec
from shared.security import OPERATOR, Keyring, generate

COLUMNS = [("id", "group"), ("protected", "prot"), ("configured_hz", "cfg Hz"),
           ("achieved_hz", "got Hz"), ("commit_p50_ms", "p50 ms"), ("commit_p99_ms", "p99 ms"),
           ("held", "held"), ("committed", "acked"), ("epoch", "epoch"), ("suspended", "susp"),
           ("buffering", "buf"), ("target", "target"), ("bytes_last", "bytes"),
           ("retries", "retries")]
FLOW_COLUMNS = [("flow", "flow"), ("group", "group"), ("version", "version"),
                ("modified", "dirty"), ("ckpt_epoch", "ckpt epoch")]


def table(groups: list[dict], columns=COLUMNS) -> str:
    rows = [[h for _, h in columns]]
    for g in groups:
        rows.append(["" if g.get(k) is None else str(g.get(k, "")) for k, _ in columns])
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def flow_key(spec: str) -> str:
    """A flow as picoctl takes it -> the hex key the RM expects."""
    s = spec.strip()
    if len(s) == 2 * KEY_SIZE and all(c in "0123456789abcdefABCDEF" for c in s):
        return s.lower()
    return parse_key_spec(s).hex()


def request(args) -> tuple[int, dict]:
    """The wire request for the parsed command line."""
    if args.cmd in ("groups", "stats"):
        return wire.STATS, {}
    if args.cmd in ("scale-in", "scale-out"):
        return wire.SCALE, {"op": args.cmd[6:], "replica": args.member}
    if args.cmd in ("suspend", "resume"):
        return (wire.SUSPEND if args.cmd == "suspend" else wire.RESUME), {"group": args.group}
    if args.cmd == "flows":
        body = {"limit": args.limit}
        if args.group is not None:
            body["group"] = args.group
        return wire.FLOWS, body
    if args.cmd == "move":
        return wire.MOVE, {"key": flow_key(args.flow), "group": args.group}
    if args.gcmd == "delete":
        return wire.GROUP_DELETE, {"group": args.group}
    body = {"group": args.group}
    if args.frequency is not None:
        body["frequency_hz"] = args.frequency
    if args.target is not None:
        body["target"] = args.target
    if args.buffering is not None:
        body["buffering"] = args.buffering == "on"
    return (wire.GROUP_CREATE if args.gcmd == "create" else wire.GROUP_SET), body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="picoctl", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--replica", help="replica name in the config (uses its rm_endpoint)")
    where.add_argument("--endpoint", help="the RM's endpoint, e.g. tcp://127.0.0.1:7201")
    ap.add_argument("--json", action="store_true", help="print the reply as JSON")
    ap.add_argument("--key", help="with security.curve: the key pair to connect with, a name "
                    "in security.keys_dir or the path of a .key_secret file (default: operator)")
    ap.add_argument("--timeout", type=int, default=5000,
                    help="milliseconds to wait (an operator change may wait up to 4 s for "
                    "its groups to go quiet)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="write CurveZMQ key pairs")
    kg.add_argument("dir", help="the keys directory (security.keys_dir)")
    kg.add_argument("names", nargs="+", metavar="NAME",
                    help="replica names, controller, operator")
    kg.add_argument("--force", action="store_true", help="replace existing key files")
    sub.add_parser("groups")
    sub.add_parser("stats")
    for name in ("suspend", "resume"):
        sub.add_parser(name).add_argument("group", type=int)
    gsub = sub.add_parser("group").add_subparsers(dest="gcmd", required=True)
    for name in ("create", "set"):
        p = gsub.add_parser(name)
        p.add_argument("group", type=int)
        p.add_argument("--frequency", type=int)
        p.add_argument("--target", help="replica name, or 'none'")
        p.add_argument("--buffering", choices=["on", "off"])
    gsub.add_parser("delete").add_argument("group", type=int)
    fl = sub.add_parser("flows")
    fl.add_argument("--group", type=int)
    fl.add_argument("--limit", type=int, default=100)
    for name in ("scale-in", "scale-out"):  # to the controller (control.controller_endpoint)
        sub.add_parser(name).add_argument("member", help="the replica to remove / add")
    mv = sub.add_parser("move")
    mv.add_argument("flow", help="'tcp 10.0.0.1:1234 10.0.0.2:80' (quoted) or a hex key")
    mv.add_argument("group", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "keygen":
        return keygen(args)

    try:
        endpoint = args.endpoint
        if endpoint is None and args.cmd in ("scale-in", "scale-out"):
            endpoint = load_config(args.config).control.controller_endpoint
            if not endpoint:
                print(f"picoctl: {args.config} has no control.controller_endpoint",
                      file=sys.stderr)
                return 2
        elif endpoint is None and args.replica is None:
            print("picoctl: say which replica: --replica NAME or --endpoint URL",
                  file=sys.stderr)
            return 2
        if endpoint is None:
            rep = load_config(args.config).replica(args.replica)
            if not rep.rm_endpoint:
                print(f"picoctl: replica {rep.name} has no rm_endpoint in {args.config}",
                      file=sys.stderr)
                return 2
            endpoint = rep.rm_endpoint
        try:
            type_, body = request(args)
        except ValueError as e:
            print(f"picoctl: {e}", file=sys.stderr)
            return 2
        curve = _curve(load_config(args.config), endpoint, args)
        with ControlClient(endpoint, timeout_ms=args.timeout, curve=curve) as c:
            reply = json.loads(c.request(type_, wire.json_body(body)).body)
    except AuthRefused as e:
        print(f"picoctl: {e}", file=sys.stderr)
        return 1
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
    elif args.cmd == "flows":
        print(table(reply["flows"], FLOW_COLUMNS))
        print(f"{len(reply['flows'])} of {reply['total']} flow(s)")
    else:
        print(" ".join(f"{k}={v}" for k, v in reply.items()))
    return 0


def _curve(config, endpoint: str, args):
    """The CURVE client settings for `endpoint` (None with security.curve off)."""
    keys = Keyring(config, OPERATOR, key=args.key)
    if not keys.enabled:
        return None
    server = keys.server_for_endpoint(endpoint)
    if server is None:
        raise PicoError(f"{endpoint} is not an endpoint of {config.path}, so its public key "
                        "is unknown: use --replica NAME, or the config that lists it")
    return keys.client(server)


def keygen(args) -> int:
    try:
        made = generate(Path(args.dir), args.names, force=args.force)
    except (PicoError, OSError) as e:
        print(f"picoctl: {e}", file=sys.stderr)
        return 1
    for name, public in made:  # public keys only: the secrets stay in their files
        print(f"{name} {public.decode()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
