"""A real HTTP proxy that injects tracking-server faults: `python -m tests.fault_proxy`.

It forwards every request to the upstream MLflow server, except requests whose path starts
with a rule's `path`: those get the rule's `action` ("503": an error answer, as a server under
maintenance gives; "drop": the connection closed with no answer, as a crashed server leaves)
for the next `times` matching requests (-1: always).  The rules are a JSON file the test
rewrites while the proxy runs; each injected fault is appended to `{rules}.hits`.
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length"}


def write_rules(path: str | Path, *rules: dict) -> None:
    """Replace the proxy's rules (each {"path", "action", "times"}); the proxy reads them per request."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(list(rules)))
    tmp.replace(path)


def hits(path: str | Path) -> list[str]:
    """The faults injected so far, one "action path" line each."""
    log = Path(f"{path}.hits")
    return log.read_text().splitlines() if log.exists() else []


class FaultProxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: urllib.parse.SplitResult
    rules_file: Path
    lock = threading.Lock()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _take_fault(self) -> str | None:
        with self.lock:
            try:
                rules = json.loads(self.rules_file.read_text())
            except (OSError, json.JSONDecodeError):
                return None
            for rule in rules:
                if self.path.startswith(rule["path"]) and rule.get("times", -1) != 0:
                    if rule.get("times", -1) > 0:
                        rule["times"] -= 1
                        write_rules(self.rules_file, *rules)
                    with open(f"{self.rules_file}.hits", "a") as fh:
                        fh.write(f"{rule['action']} {self.path}\n")
                    return rule["action"]
        return None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        fault = self._take_fault()
        if fault == "drop":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "503":
            payload = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected fault"}).encode()
            self._answer(503, [("Content-Type", "application/json")], payload)
            return
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=120)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self._answer(resp.status, [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP], data)
        finally:
            conn.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--rules", required=True)
    args = parser.parse_args()
    FaultProxy.upstream = urllib.parse.urlsplit(args.upstream)
    FaultProxy.rules_file = Path(args.rules)
    if not FaultProxy.rules_file.exists():
        write_rules(FaultProxy.rules_file)
    ThreadingHTTPServer(("127.0.0.1", args.port), FaultProxy).serve_forever()


if __name__ == "__main__":
    main()
