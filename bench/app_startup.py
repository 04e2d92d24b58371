"""How long a user waits: app process start -> page served, and page served -> demo model loaded with statistics
(the first call the page makes), measured against one plain evaluation pass of the demo model in the same run.
  python bench/app_startup.py
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import _common  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        served = time.perf_counter() - t0
        from gradio_client import Client

        c = Client(f"http://127.0.0.1:{port}/", verbose=False)
        t1 = time.perf_counter()
        c.predict("demo", "cpu", "float32", "demo", None, 2048, api_name="/on_load")
        model_in = time.perf_counter() - t1
        c.predict(api_name="/on_stats")
        loaded = time.perf_counter() - t1
    finally:
        proc.terminate()
        proc.wait(10)
    from explorer import load_data, load_model, perplexity

    model, tok, view = load_model(device="cpu")
    ev = load_data(tok, "demo", block_len=128, max_tokens=2048).eval
    t2 = time.perf_counter()
    perplexity(model, ev)
    one_eval = time.perf_counter() - t2
    print(f"process start -> page served:             {served:6.2f} s")
    print(f"page -> demo model loaded (summary shown): {model_in:6.2f} s")
    print(f"page -> statistics and plots:             {loaded:6.2f} s")
    print(f"one plain evaluation pass (same tokens):  {one_eval:6.2f} s")
    print(f"ratio (load + statistics / one eval pass): {loaded / one_eval:.2f}")


if __name__ == "__main__":
    main()
