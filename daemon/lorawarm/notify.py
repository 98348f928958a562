"""systemd's notify protocol (sd_notify): READY, STATUS, WATCHDOG and STOPPING datagrams.

Tiny on purpose: one datagram per call to the unix socket named in `NOTIFY_SOCKET` (a leading
`@` is an abstract socket). Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.
A failed send is logged and otherwise ignored: the daemon must not die because systemd is busy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from lorawarm.logs import get_logger

log = get_logger(__name__)


class Notifier:
    """Sends sd_notify messages for this process."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_seconds: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6

    def send(self, **fields: str) -> bool:
        """Send `KEY=value` lines (`ready="1"` becomes `READY=1`); True when it was sent."""
        if not self._address:
            return False
        message = "\n".join(f"{k.upper()}={v.replace(chr(10), ' ')}" for k, v in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as err:
            log.warning("sd_notify_failed", error=str(err))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready="1", status=status)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog="1")

    def stopping(self) -> bool:
        return self.send(stopping="1", status="stopping")
