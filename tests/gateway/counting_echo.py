"""A function instance that counts the requests it serves at once and reports the count in each answer.

POST (any path): sleeps COUNTING_DELAY_MS, answers {"concurrent": <requests in progress when it arrived,
itself included>, "body": <the request body>}. GET /health: 200. Listens on $HOST:$PORT. Standard library.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DELAY = float(os.environ.get("COUNTING_DELAY_MS", "100")) / 1000.0
lock = threading.Lock()
in_progress = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(b"ok")

    def do_POST(self) -> None:
        global in_progress
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock:
            in_progress += 1
            seen = in_progress
        try:
            time.sleep(DELAY)
        finally:
            with lock:
                in_progress -= 1
        self._answer(json.dumps({"concurrent": seen, "body": body.decode()}).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


ThreadingHTTPServer(
    (os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8000"))), Handler
).serve_forever()
