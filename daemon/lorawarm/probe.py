"""`python3 -m lorawarm.probe /readyz`: a container probe for a status API that listens on
loopback only (kubelet's httpGet probes come from outside the pod and cannot reach it).

Exit 0 when `GET <path>` on `127.0.0.1:$LORAWARM_STATUS_PORT` answers 200, 1 otherwise, with
the reason on stderr (kubelet shows it in the pod's events). Sends `LORAWARM_STATUS_TOKEN` as
a bearer token when it is set (`/readyz` needs it then). Standard library only: a probe runs
every few seconds, and importing the daemon's web stack each time would cost more than the
answer.
"""

from __future__ import annotations

import http.client
import os
import sys
from collections.abc import Mapping, Sequence

EXIT_OK = 0
EXIT_FAILED = 1


def probe(path: str, environ: Mapping[str, str], timeout: float = 4.0) -> tuple[bool, str]:
    """(answered 200, what happened) for `GET path` on the local status API."""
    host = environ.get("LORAWARM_PROBE_HOST", "127.0.0.1")
    port = int(environ.get("LORAWARM_STATUS_PORT") or 8765)
    headers = {}
    token = environ.get("LORAWARM_STATUS_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read(512).decode(errors="replace")
    except OSError as err:
        return False, f"{host}:{port}{path}: {err}"
    finally:
        connection.close()
    return response.status == 200, f"{host}:{port}{path}: HTTP {response.status} {body}"


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or not args[0].startswith("/"):
        print("usage: python3 -m lorawarm.probe /healthz|/readyz", file=sys.stderr)
        return 2
    ok, said = probe(args[0], os.environ)
    if not ok:
        print(f"lorawarm probe: {said}", file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
