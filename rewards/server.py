"""`uniloop serve-judge MODEL`: a transformers VLM behind an OpenAI-compatible chat endpoint.

So a spare GPU can host a judge without vLLM, and so the tests exercise the remote judge backend
against a real server process. Standard library only (ThreadingHTTPServer):

- `POST /v1/chat/completions`: OpenAI chat format; content parts `text` and `image_url` with base64
  data URLs; `max_tokens` (or `max_completion_tokens`), `temperature` (0 = greedy), `top_p`, `seed`.
  `finish_reason` is `length` when the reply hit max_tokens. No streaming, n = 1.
- `GET /v1/models`, `GET /health`, `GET /stats` (request, batch and fault counters).

Concurrent requests are merged into batches (up to --max-batch-size, waiting at most
--batch-wait-ms for company) and run one batch at a time on the model's device.

`--test-faults` (tests only) makes requests whose text contains a marker misbehave, so client
retries can be tested against a real server: `[[fault:500]]` answers HTTP 500, `[[fault:500x2]]`
only the first 2 times that exact request arrives, `[[fault:sleep=3]]` / `[[fault:sleep=3x1]]`
waits 3 s before answering. Markers are removed before the model sees the text.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .judge_backends import TransformersVLM, decode_data_url
from .tiny_judge import build_tiny_vlm_judge, default_tiny_judge_dir

_FAULT = re.compile(r"\[\[fault:(500|sleep=[0-9.]+)(?:x([0-9]+))?\]\]")


class BadRequest(ValueError):
    pass


def openai_to_hf(messages) -> tuple[list[dict], list]:
    """OpenAI chat messages -> (HF chat messages with image placeholders, PIL images in order)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out, images = [], []
    for k, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{k}] needs a role of system, user or assistant")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{k}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                url = part.get("image_url", {})
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise BadRequest(f"messages[{k}].content[{j}]: only base64 data URLs are accepted "
                                     "(this server does not fetch remote images)")
                try:
                    images.append(decode_data_url(url))
                except ValueError as e:
                    raise BadRequest(f"messages[{k}].content[{j}]: {e}") from None
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"messages[{k}].content[{j}]: unsupported part type {kind!r}")
        out.append({"role": msg["role"], "content": parts})
    return out, images


class _Job:
    def __init__(self, conv, params):
        self.conv, self.params, self.future = conv, params, Future()


class Batcher:
    """Merges concurrent requests with the same generation settings into one model batch."""

    def __init__(self, engine: TransformersVLM, max_batch: int, wait_s: float):
        self.engine, self.max_batch, self.wait_s = engine, max_batch, wait_s
        self.q: queue.Queue = queue.Queue()
        self.stats = {"batches": 0, "max_batch": 0, "generated": 0}
        self.thread = threading.Thread(target=self._loop, name="judge-batcher", daemon=True)
        self.thread.start()

    def submit(self, conv, params: dict) -> Future:
        job = _Job(conv, params)
        self.q.put(job)
        return job.future

    def _loop(self):
        while True:
            jobs = [self.q.get()]
            deadline = time.monotonic() + self.wait_s
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list[_Job]] = {}
            for j in jobs:
                groups.setdefault(tuple(sorted(j.params.items())), []).append(j)
            for key, group in groups.items():
                try:
                    results = self.engine.chat([j.conv for j in group], **dict(key))
                except Exception as e:  # answer every waiting request, keep serving
                    for j in group:
                        j.future.set_exception(e)
                    continue
                self.stats["batches"] += 1
                self.stats["max_batch"] = max(self.stats["max_batch"], len(group))
                self.stats["generated"] += len(group)
                for j, r in zip(group, results):
                    j.future.set_result(r)


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: TransformersVLM, model_name: str, max_batch: int = 8,
                 batch_wait_s: float = 0.005, max_tokens_limit: int = 4096, api_key: str | None = None,
                 test_faults: bool = False, log_requests: bool = False, max_request_bytes: int = 64 << 20):
        super().__init__(address, JudgeHandler)
        self.max_request_bytes = max_request_bytes
        self.engine, self.model_name = engine, model_name
        self.batcher = Batcher(engine, max_batch, batch_wait_s)
        self.max_tokens_limit, self._api_key = max_tokens_limit, api_key
        self.test_faults, self.log_requests = test_faults, log_requests
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "faults": 0, "errors": 0}
        self.fault_seen: dict[str, int] = {}

    def count(self, key: str):
        with self.lock:
            self.counts[key] += 1

    def apply_faults(self, hf_messages) -> int | None:
        """Strip fault markers; sleep or return an HTTP status to fail with (test mode only)."""
        text = "".join(p.get("text", "") for m in hf_messages for p in m["content"])
        markers = _FAULT.findall(text)
        for m in hf_messages:
            for p in m["content"]:
                if p["type"] == "text":
                    p["text"] = _FAULT.sub("", p["text"])
        status = None
        for kind, times in markers:
            with self.lock:
                n = self.fault_seen[kind + times + text] = self.fault_seen.get(kind + times + text, 0) + 1
            if times and n > int(times):
                continue
            self.count("faults")
            if kind == "500":
                status = 500
            else:
                time.sleep(float(kind.split("=")[1]))
        return status


class JudgeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: JudgeServer

    def log_message(self, fmt, *args):  # never echo headers (they may carry the API key)
        if self.server.log_requests:
            sys.stderr.write(f"serve-judge: {self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): fine
            self.close_connection = True

    def _error(self, status: int, message: str, kind: str = "invalid_request_error"):
        self._send(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self):
        if self.path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                         "owned_by": "uniloop"}]})
        elif self.path == "/stats":
            with self.server.lock:
                self._send(200, {**self.server.counts, **self.server.batcher.stats})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        if self.path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= self.server.max_request_bytes:
            # refuse before reading: a huge declared body would otherwise be allocated in this process
            self.close_connection = True
            self._error(413 if length > 0 else 400, f"the request body must be 0..{self.server.max_request_bytes} "
                        f"bytes (Content-Length {self.headers.get('Content-Length')!r}); see --max-request-mb")
            return
        raw = self.rfile.read(length)
        self.server.count("requests")
        key = self.server._api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            self._error(401, "missing or wrong API key", "authentication_error")
            return
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            if body.get("stream"):
                raise BadRequest("streaming is not supported")
            if int(body.get("n", 1)) != 1:
                raise BadRequest("only n = 1 is supported")
            if body.get("model") not in (None, self.server.model_name):
                self._error(404, f"the model {body.get('model')!r} does not exist: this server serves "
                            f"{self.server.model_name!r} (GET /v1/models)", "not_found_error")
                return
            conv_msgs, images = openai_to_hf(body.get("messages"))
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
            if not 1 <= max_tokens <= self.server.max_tokens_limit:
                raise BadRequest(f"max_tokens must be in [1, {self.server.max_tokens_limit}]")
            params = {"max_new_tokens": max_tokens, "temperature": float(body.get("temperature", 0.0) or 0.0),
                      "top_p": float(body.get("top_p", 1.0) or 1.0), "seed": body.get("seed")}
        except (BadRequest, ValueError, TypeError) as e:
            self._error(400, str(e))
            return
        if self.server.test_faults:
            status = self.server.apply_faults(conv_msgs)
            if status is not None:
                self._error(status, "injected test fault", "server_error")
                return
        try:
            text, finished, n_prompt, n_completion = self.server.batcher.submit((conv_msgs, images), params).result()
        except Exception as e:
            self.server.count("errors")
            self._error(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            return
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop" if finished else "length"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion}})


def build_parser():
    p = argparse.ArgumentParser(prog="uniloop serve-judge",
                                description="Serve a transformers VLM as an OpenAI-compatible chat endpoint.")
    p.add_argument("model", help="hub id or local directory of an image-text-to-text model; `tiny` builds "
                                 "the tiny Qwen2.5-VL judge offline (tests)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; the URL is printed)")
    p.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attn-implementation", default=None, help="transformers attention implementation")
    p.add_argument("--max-request-mb", type=float, default=64.0,
                   help="largest request body accepted (larger: HTTP 413 before reading it)")
    p.add_argument("--served-model-name", default=None, help="model name reported and accepted (default: MODEL)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests merged into one generate call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--api-key-env", default=None,
                   help="require `Authorization: Bearer $VAR` where VAR is this environment variable")
    p.add_argument("--tiny-dir", default=None, help="where `tiny` is built (default: $UNILOOP_CACHE/tiny_vlm_judge)")
    p.add_argument("--test-faults", action="store_true", help="honour [[fault:...]] markers (tests only)")
    p.add_argument("--log-requests", action="store_true", help="log one line per request to stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    path = args.model
    if args.model == "tiny":
        path = build_tiny_vlm_judge(args.tiny_dir or default_tiny_judge_dir())
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            print(f"uniloop serve-judge: environment variable {args.api_key_env!r} is not set", file=sys.stderr)
            return 2
    engine = TransformersVLM(path, device=args.device, dtype=args.dtype, attn_implementation=args.attn_implementation,
                             batch_size=args.max_batch_size)
    server = JudgeServer((args.host, args.port), engine, args.served_model_name or args.model,
                         max_batch=args.max_batch_size, batch_wait_s=args.batch_wait_ms / 1000,
                         max_tokens_limit=args.max_tokens_limit, api_key=key, test_faults=args.test_faults,
                         max_request_bytes=int(args.max_request_mb * (1 << 20)),
                         log_requests=args.log_requests)
    host, port = server.server_address[:2]

    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"uniloop serve-judge: serving {args.served_model_name or args.model} at http://{host}:{port}/v1",
          flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
