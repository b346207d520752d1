"""Start the chat app as a server in a subprocess and talk to it as a browser would: shared by the app benchmarks.

`start_server(config, run_dir, overrides)` runs `lcrec_chat.ui.serve` on a free local port with `--set`-style
overrides and returns (process, url) once the page answers; `timed_reply(client, message)` sends one message on
the stateful /chat endpoint and times the first streamed update and the whole reply.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# as app.py: the backbone precision is the app's default (hardware.serving_dtype, LCREC_DTYPE) unless an override sets it
SERVER = """
import logging, os, sys
from lcrec_chat.config import load_config
from lcrec_chat.hardware import serving_dtype
from lcrec_chat.ui import serve
logging.basicConfig(level=logging.WARNING)
cfg = load_config(sys.argv[1], ["run_dir=" + sys.argv[2]] + sys.argv[4:])
if not any(o.startswith("model.dtype=") for o in sys.argv[4:]):
    cfg.model.dtype = serving_dtype(os.environ.get("LCREC_DTYPE", "auto"), cfg.model.device)
cfg.chat.host = "127.0.0.1"
serve(cfg, port=int(sys.argv[3]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, run_dir: str, overrides: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """The app on `run_dir` in a subprocess; (process, url) once its page answers, or SystemExit with its log."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, config, run_dir, str(port), *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit(f"server did not answer within {timeout:.0f} s")


def timed_reply(client, message: str) -> tuple[float, float, dict]:
    """One message on /chat: (seconds to the first streamed update, seconds to the full reply, the reply data)."""
    start = time.perf_counter()
    first = None
    job = client.submit(message, api_name="/chat")
    for _ in job:
        if first is None:
            first = time.perf_counter() - start
    result = job.result()
    total = time.perf_counter() - start
    return (first if first is not None else total), total, result[-1]
