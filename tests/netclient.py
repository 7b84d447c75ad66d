"""HTTP clients of a guest, run in its network namespace; each prints one JSON report.

``download URL``: one GET read to the end: bytes, SHA-256, the longest wait between two
reads (the stall a client sees), and the error if it failed.

``loop URL SECONDS``: GET after GET, each on a new connection, for SECONDS or until SIGTERM
(the request under way completes first): every answer body (the guest's counter), the
longest request, and any error.  A pair that loses or repeats nothing gives consecutive
numbers.
"""

import hashlib
import http.client
import json
import signal
import sys
import time
import urllib.parse

TIMEOUT_S = 30


def _connection(url):
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT_S), parts.path or "/"


def download(url):
    report = {"bytes": 0, "sha256": None, "max_stall_s": 0.0, "error": None}
    digest = hashlib.sha256()
    start = time.monotonic()
    try:
        conn, path = _connection(url)
        conn.request("GET", path)
        response = conn.getresponse()
        report["status"] = response.status
        last = time.monotonic()
        while True:
            chunk = response.read(65536)
            now = time.monotonic()
            report["max_stall_s"] = max(report["max_stall_s"], now - last)
            last = now
            if not chunk:
                break
            digest.update(chunk)
            report["bytes"] += len(chunk)
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        report["error"] = f"{type(e).__name__}: {e}"
    report["sha256"] = digest.hexdigest()
    report["seconds"] = time.monotonic() - start
    return report


def loop(url, seconds):
    report = {"answers": [], "max_request_s": 0.0, "error": None}
    deadline = time.monotonic() + seconds
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    while time.monotonic() < deadline and not stopped:
        began = time.monotonic()
        try:
            conn, path = _connection(url)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode("latin1").strip()
            conn.close()
        except (OSError, http.client.HTTPException) as e:
            report["error"] = f"request {len(report['answers']) + 1}: {type(e).__name__}: {e}"
            break
        report["answers"].append(body)
        report["max_request_s"] = max(report["max_request_s"], time.monotonic() - began)
    return report


def main(argv):
    if len(argv) == 2 and argv[0] == "download":
        report = download(argv[1])
    elif len(argv) == 3 and argv[0] == "loop":
        report = loop(argv[1], float(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
