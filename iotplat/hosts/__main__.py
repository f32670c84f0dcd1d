"""`python -m iotplat.hosts up|down|status --instance NAME [--hosts h1,h2]`: the local target's hosts
without the rest of iotplat, for tests and operators (e.g. a teardown after a killed session)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import HostProviderError, LocalSettings
from .local import LocalProvider
from .settings import DEFAULT_STATE_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iotplat.hosts", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--instance", required=True, help="instance key, e.g. <platform>-<env>")
    parser.add_argument("--hosts", default="", help="comma-separated host names (up)")
    parser.add_argument("--network", default=None, help="private IPv4 network (default 10.213.0.0/24)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--mirror", default=None, help="Debian mirror URL (default: this machine's)")
    parser.add_argument("--proxy-port", type=int, default=None)
    parser.add_argument("--purge", action="store_true", help="down: also delete the apt cache")
    parser.add_argument("--container-engine", action="store_true",
                        help="up: the new hosts may run Docker (nspawn keyring syscalls, /var/lib/docker bind, cgroups)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        extra = {"network": args.network, "mirror": args.mirror, "proxy_port": args.proxy_port}
        settings = LocalSettings(
            instance=args.instance, state_dir=args.state_dir, container_engine=args.container_engine,
            **{k: v for k, v in extra.items() if v is not None}
        )
        provider = LocalProvider(settings)
        if args.command == "up":
            names = [n.strip() for n in args.hosts.split(",") if n.strip()]
            if not names:
                parser.error("up needs --hosts h1[,h2...]")
            hosts = provider.up(names)
            if args.json:
                print(json.dumps([h.__dict__ for h in hosts], indent=2))
            else:
                for h in hosts:
                    print(f"{h.name}\t{h.address}\tssh -i {h.ssh_private_key} {h.ssh_extra_args} {h.ssh_user}@{h.address}")
        elif args.command == "down":
            provider.down(purge=args.purge)
            if not args.json:
                print(f"instance {args.instance}: nothing left")
        else:
            status = provider.status()
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                for name, state in status.items():
                    print(f"{name}\t{state}")
        return 0
    except HostProviderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
