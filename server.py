"""--serve: one web page and a JSON API for the three trained models, on the standard library's HTTP server.

    python main.py --serve [--host 127.0.0.1] [--port 8000] [--checkpoint_dir checkpoints]

    GET  /                 the page (index.html)
    GET  /api/models       which models are loaded: {"cls": {"ready": true, ...}, "lm": {...}, "seq2seq": {...}}
    POST /api/classify     {"text": "..."}                         -> {"label": "...", "probs": {...}, "unsure": false}
    POST /api/generate     {"prompt": "...", "max_new_tokens": 100, "temperature": 0.8, "top_p": 0.95,
                            "top_k": 0, "seed": 1337, "stop_at_eos": false} -> {"text": "...", "new_tokens": n}
    POST /api/pinyin       {"text": "woaibiancheng", "beam": 4, "num_candidates": 1}
                           -> {"pred": "...", "candidates": [{"text": "...", "score": -0.1}, ...],
                               "kept": [what is no pinyin and stays as typed]}

Errors are JSON {"error": "..."}: 400 bad JSON or field (NaN and Infinity included), 404 unknown path, 413 body
over 64 KiB (the body is read and dropped first, up to 16 MiB, so every client sees the answer), 501 any other
method, 503 model not trained. Each model is loaded once at start; a connection waits without a thread until its
request arrives, then one of MAX_WORKERS threads serves it (see Server); a connection silent for IDLE_TIMEOUT
seconds is closed, and a lock per model lets requests to different models run at the same time while calls into one
model take turns (its sampling RNG and KV caches are per call, but torch's intra-op threads are better spent
on one call at a time).
"""
from __future__ import annotations

import json
import os
import queue
import selectors
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from api import ApiError
from config import Options
from errors import DataError
from registry import TASKS

MAX_BODY = 64 * 1024
MAX_DRAIN = 16 * 1024 * 1024  # an oversized body up to this size is read and dropped before the 413
IDLE_TIMEOUT = 30.0           # seconds a connection may stay silent (between or inside requests)
MAX_WORKERS = 64              # connections served at once
BACKLOG = 128                 # connections waiting to be accepted
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "index.html")


class Models:
    """The trained model of each registered task, loaded once; a model that is missing keeps the message that
    says how to train it. Each task answers its own endpoint (Task.route, Task.answer)."""

    def __init__(self, paths: dict[str, str], device):
        self.device, self.paths, self.errors, self.loaded = device, paths, {}, {}
        self.locks = {name: threading.Lock() for name in TASKS}
        for name, task in TASKS.items():
            try:
                self.loaded[name] = task.serve_load(paths[name], device)
            except DataError as e:
                self.errors[name] = str(e)
        self.routes = {task.route: name for name, task in TASKS.items()}

    def status(self) -> dict:
        out = {}
        for name, task in TASKS.items():
            if name in self.errors:
                out[name] = {"ready": False, "error": self.errors[name]}
            else:
                out[name] = {"ready": True, "checkpoint": self.paths[name], **task.serve_status(self.loaded[name])}
        return out

    def answer(self, path: str, req: dict) -> dict:
        name = self.routes[path]
        if name in self.errors:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, self.errors[name])
        with self.locks[name]:
            return TASKS[name].answer(self.loaded[name], req, self.device)


def make_handler(models: Models, quiet: bool):

    def no_constants(name: str):  # NaN, Infinity, -Infinity are not JSON, and pass every range check
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {name} is not a number")

    class Handler(BaseHTTPRequestHandler):
        server_version = "moe-toolkit"
        timeout = IDLE_TIMEOUT  # socket timeout: an idle or stalled client gives its thread back

        def send_error(self, code, message=None, explain=None):
            """The standard library's errors (501 unknown method, 400 bad request line, ...) as JSON too."""
            self.close_connection = True
            try:
                self.send_json(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})
            except OSError:
                pass  # the client is gone

        def send_json(self, status: HTTPStatus, obj: dict) -> None:
            body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                with open(PAGE, "rb") as f:
                    body = f.read()
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif path == "/api/models":
                self.send_json(HTTPStatus.OK, models.status())
            else:
                self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})

        def do_POST(self):
            path = self.path.split("?")[0]
            try:
                if path not in models.routes:
                    raise ApiError(HTTPStatus.NOT_FOUND, f"no such path: {path}")
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if length < 0:
                    raise ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length header")
                if length > MAX_BODY:
                    self.close_connection = True  # an unread rest must not be parsed as the next request
                    self.drain(length)
                    raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is "
                                                                        f"{MAX_BODY}")
                try:
                    req = json.loads(self.rfile.read(length).decode("utf-8"), parse_constant=no_constants)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {e}") from None
                if not isinstance(req, dict):
                    raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
                self.send_json(HTTPStatus.OK, models.answer(path, req))
            except ApiError as e:
                self.send_json(e.status, {"error": str(e)})
            except TimeoutError:  # the body stopped arriving before Content-Length bytes
                self.close_connection = True
                self.send_json(HTTPStatus.REQUEST_TIMEOUT, {"error": f"no data for {IDLE_TIMEOUT:g} s"})
            except Exception as e:  # a bug must not take the server down: report it as a 500
                self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

        def drain(self, length: int) -> None:
            """Read and drop an oversized body (up to MAX_DRAIN), so that a client still writing it reads the
            413 instead of a broken pipe."""
            left = min(length, MAX_DRAIN)
            try:
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass  # timed out or gone: the answer is sent anyway and the connection closed

        def log_message(self, fmt, *args):
            if not quiet:
                sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    return Handler


class Server(ThreadingHTTPServer):
    """The standard library's HTTP server with a waiting room: an accepted connection costs no thread until its
    request starts to arrive. A watcher thread holds the silent connections in one selector (closing those idle
    for IDLE_TIMEOUT); a readable one goes to a pool of MAX_WORKERS threads, which serves its one request
    (HTTP/1.0: the connection then closes). So idle or slow-to-start clients cannot use up the workers, and the
    thread count stays at MAX_WORKERS + 2 however many connections are open."""
    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="api")
        self.waiting = selectors.DefaultSelector()
        self.arrivals: queue.SimpleQueue = queue.SimpleQueue()  # accepted connections for the watcher to park
        self.bell, bell_rx = socket.socketpair()  # wakes the watcher when a connection arrives
        self.waiting.register(bell_rx, selectors.EVENT_READ)
        self.closing = threading.Event()
        self.watcher = threading.Thread(target=self.watch, name="api-waiting-room", daemon=True)
        self.watcher.start()

    def process_request(self, request, client_address):
        self.arrivals.put((request, client_address))
        self.bell.send(b"\0")

    def watch(self):
        """Park new connections; hand each to the pool when its first bytes arrive; close the long-silent."""
        while not self.closing.is_set():
            for key, _ in self.waiting.select(timeout=min(1.0, IDLE_TIMEOUT / 4)):
                if key.data is None:  # the bell: take in the new arrivals
                    key.fileobj.recv(4096)
                    while not self.arrivals.empty():
                        request, address = self.arrivals.get()
                        try:
                            self.waiting.register(request, selectors.EVENT_READ, (address, time.monotonic()))
                        except (OSError, ValueError):  # gone already: the watcher itself must not die
                            self.shutdown_request(request)
                else:
                    self.waiting.unregister(key.fileobj)
                    self.pool.submit(self.process_request_thread, key.fileobj, key.data[0])
            now = time.monotonic()
            for key in list(self.waiting.get_map().values()):
                if key.data is not None and now - key.data[1] > IDLE_TIMEOUT:
                    self.waiting.unregister(key.fileobj)
                    self.shutdown_request(key.fileobj)

    def server_close(self):
        self.closing.set()
        self.bell.send(b"\0")
        self.watcher.join()
        for key in list(self.waiting.get_map().values()):
            if key.data is None:
                key.fileobj.close()
            else:
                self.shutdown_request(key.fileobj)
        self.waiting.close()
        self.bell.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        super().server_close()


def make_server(host: str, port: int, paths: dict[str, str], device, quiet: bool = False) -> Server:
    """The server, bound and ready (port 0 picks a free one: server.server_address[1])."""
    models = Models(paths, device)
    try:
        server = Server((host, port), make_handler(models, quiet))
    except OSError as e:
        raise DataError(f"--serve: cannot listen on {host}:{port} ({e.strerror})") from None
    server.models = models
    return server


def serve(opts: Options, device) -> int:
    if not 0 <= opts.port <= 65535:
        raise DataError(f"--port {opts.port}: must be 0-65535 (0 picks a free port)")
    paths = {task: os.path.join(opts.checkpoint_dir, f"{task}.pt") for task in TASKS}
    server = make_server(opts.host, opts.port, paths, device, opts.quiet)
    for task, status in server.models.status().items():
        print(f"{task}: {'ready' if status['ready'] else status['error']}", file=sys.stderr)
    host, port = server.server_address[:2]
    print(f"serving on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
