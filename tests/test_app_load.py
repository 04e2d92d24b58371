"""Eight sessions at once: every one loads the demo and keeps getting previews for 60 s while the others click
too (the app serialises model loading, runs four jobs at a time and answers each session in turn)."""
import random
import threading
import time

import numpy as np
import pytest
from test_app import launched_process

SESSIONS, SECONDS = 8, 60


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    return 0


@pytest.mark.slow
def test_eight_sessions_clicking_previews_all_keep_answering(demo, tmp_path):
    from gradio_client import Client

    with launched_process(tmp_path / "out", tmp_path / "app.log") as (url, proc):
        rss_before = _rss(proc.pid)
        loads, latencies, errors, answered = [], [], [], [0] * SESSIONS
        start = threading.Barrier(SESSIONS)

        def session(i: int) -> None:
            rng = random.Random(i)
            try:
                c = Client(url, verbose=False)
                start.wait()  # every session opens and loads at the same moment
                t = time.perf_counter()
                c.predict("demo", "cpu", "float32", "demo", None, 1024, api_name="/on_load")
                c.predict(api_name="/on_stats")
                loads.append(time.perf_counter() - t)
                end = time.time() + SECONDS
                while time.time() < end:
                    plan = {str(layer): rng.sample(range(8), 2) for layer in range(rng.randint(1, 4))}
                    t = time.perf_counter()
                    out = c.predict('{"drop_experts": %s}' % str(plan).replace("'", '"'), api_name="/on_json")
                    latencies.append(time.perf_counter() - t)
                    assert "perplexity" in str(out[1]).lower(), out[1]
                    answered[i] += 1
            except Exception as err:  # noqa: BLE001  (every failure is reported below)
                errors.append(f"session {i}: {type(err).__name__}: {err}")

        threads = [threading.Thread(target=session, args=(i,)) for i in range(SESSIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 600)
        rss_after = _rss(proc.pid)
        log = (tmp_path / "app.log").read_text()
    assert not errors, "\n".join(errors) + "\n" + log[-3000:]
    assert all(n >= 1 for n in answered), answered  # no session starved
    assert "Cannot copy out of meta tensor" not in log and "MISSING" not in log
    p50, p95 = np.percentile(latencies, [50, 95])
    print(f"\n{SESSIONS} sessions, {SECONDS} s of previews: {len(latencies)} answered ({answered}), latency p50 "
          f"{p50:.2f} s, p95 {p95:.2f} s; loads (model + statistics) median {np.median(loads):.1f} s, slowest "
          f"{max(loads):.1f} s; app memory {rss_before / 2**30:.2f} GiB before, {rss_after / 2**30:.2f} GiB after")
