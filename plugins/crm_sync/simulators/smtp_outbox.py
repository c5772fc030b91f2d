"""A local SMTP server on loopback that files every message it receives as an `.eml`.

Guarantees:
- Each accepted message is written to `folder` as `<UTC timestamp>-<counter>.eml`, containing
  the message bytes exactly as the client sent them after SMTP dot-unstuffing (RFC 5321 4.5.2):
  no Received header added, no re-encoding, CRLF line endings kept. Names sort in arrival order.
- A file appears only when complete (written to a temporary name, then renamed), so a reader
  polling the folder never sees half a message.
- No authentication and no relaying: it only listens on the host it is given, 127.0.0.1 by default.
"""
from __future__ import annotations

import argparse
import itertools
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path


class _OutboxHandler:
    def __init__(self, folder: Path):
        self.folder = folder
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope) -> str:
        with self._lock:  # stamp and counter together, so names sort in arrival order
            number = next(self._counter)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.folder / f"{stamp}-{number:06d}.eml"
        partial = target.with_suffix(".eml.part")
        partial.write_bytes(envelope.original_content)
        os.replace(partial, target)
        return "250 Message accepted for delivery"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class OutboxServer:
    """The SMTP outbox on a background thread; use as a context manager or start()/stop()."""

    def __init__(self, folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.folder = Path(folder)
        self.host = host
        # aiosmtpd's controller connects to its own port to check readiness, so it needs a real one.
        self.port = port or _free_port(host)
        self._controller = None

    def start(self) -> "OutboxServer":
        import logging

        from aiosmtpd.controller import Controller

        logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every SMTP verb at INFO

        self.folder.mkdir(parents=True, exist_ok=True)
        self._controller = Controller(_OutboxHandler(self.folder), hostname=self.host, port=self.port,
                                      enable_SMTPUTF8=True)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> "OutboxServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def messages(self) -> list[Path]:
        """The stored messages, oldest first."""
        return sorted(self.folder.glob("*.eml"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run a loopback SMTP server that stores mail as .eml files.")
    parser.add_argument("--dir", default=".local/outbox", help="folder for the .eml files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    args = parser.parse_args(argv)
    with OutboxServer(args.dir, host=args.host, port=args.port) as server:
        print(f"SMTP outbox on {server.host}:{server.port}, writing to {server.folder.resolve()}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
