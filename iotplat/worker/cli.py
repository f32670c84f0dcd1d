"""``iotplat worker``: argument wiring and the process lifecycle (exit 0 ok, 1 failure, 2 bad config)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from .config import ConfigError, load_config

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE",
                        help="the worker config (TOML, docs/worker-config.md)")
    parser.add_argument("--replica", type=int, default=None, metavar="N",
                        help="replica number 1..N (default: $IOTPLAT_WORKER_REPLICA); fills {replica}")
    parser.add_argument("--transport", choices=("native", "paho"), default=os.environ.get(
        "IOTPLAT_WORKER_TRANSPORT", "native"),
        help="MQTT client implementation (default: native); a config with [nats] always uses NATS")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    parser.add_argument("--check", action="store_true", help="only check the config file, then exit")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.replica)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    from .core import StartupError, Worker
    from .httpserver import serve
    from .logs import Log

    log = Log(level=args.log_level, replica=cfg.replica)
    if args.check:
        from .decoders import build_decoders

        try:
            build_decoders(cfg)  # what the worker's start builds: every decoder, with its options
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{cfg.path}: ok")
        return EXIT_OK

    def ready(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    transport = "nats" if cfg.nats is not None else args.transport
    try:
        worker = Worker(cfg, log, transport_kind=transport, ready=ready)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal", signal=signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    srv = None
    try:
        if cfg.http.port:
            try:
                srv = serve(worker, cfg.http.listen, cfg.http.port)
            except OSError as e:
                print(f"error: {cfg.path}: http.port: cannot listen on {cfg.http.listen}:{cfg.http.port}: "
                      f"{e.strerror}; pick a free port", file=sys.stderr)
                return EXIT_FAILURE
        log.info("starting", transport=transport, broker=cfg.broker,
                 tls=cfg.nats.tls if cfg.nats is not None else cfg.mqtt.tls, client_id=cfg.client_id,
                 influxdb=cfg.influxdb.url,
                 spool_mode=cfg.spool.mode, http_port=cfg.http.port)
        worker.start()
        while not stop.is_set() and not worker.fatal_event.is_set():
            stop.wait(0.5)
        worker.shutdown()
        if worker.fatal:
            print(f"error: {worker.fatal}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    finally:
        if srv is not None:
            srv.shutdown()
            srv.server_close()
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iotplat worker",
                                     description="Ingestion worker: MQTT -> InfluxDB, at-least-once.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
