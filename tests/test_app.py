"""The Gradio app, launched for real on 127.0.0.1 and driven through gradio_client and a real browser."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(demo, tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.time()
    while time.time() - t0 < 120:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("app did not start: " + log.read_text())
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _idle(page, timeout=120_000):
    """Wait until Gradio shows no running job on the page."""
    page.wait_for_function("() => !document.body.innerText.includes('processing |')", timeout=timeout)


def _load(client):
    """What the Load button does: the model, then the statistics."""
    client.predict("demo", "cpu", "float32", "demo", None, 2048, api_name="/on_load")
    return client.predict(api_name="/on_stats")


def test_model_and_routing(client):
    out = _load(client)
    summary = out[0]
    assert "MixtralForCausalLM" in summary and "Perplexity (evaluation)" in summary and "code" in summary
    html = client.predict("def f(x):\n    return x", 1, api_name="/on_route")
    assert html.count("<span title=") >= 5 and "layer 1" in html


def test_saliency_plan_preview_and_errors(client):
    from gradio_client.exceptions import AppError

    _load(client)
    sal = client.predict(["frequency", "reap"], 1, "mean-output", api_name="/on_saliency")
    assert len(sal) == 3
    res = client.predict("drop-experts", 0.25, "reap", "mc-smoe", "uniform", False, api_name="/on_preset")
    md, plan_json = res[0], res[1]
    assert "Preview perplexity" in md and '"drop_experts"' in plan_json
    with pytest.raises(AppError, match="removes every expert"):
        client.predict('{"drop_experts": {"0": [0,1,2,3,4,5,6,7]}}', api_name="/on_json")
    with pytest.raises(AppError, match="not found"):
        client.predict("/no/such/model", "cpu", "float32", "demo", None, 2048, api_name="/on_load")
    with pytest.raises(AppError, match="too short|no .txt"):
        client.predict(str(ROOT / "tests"), None, 2048, api_name="/on_data")
    # the session is still usable after the errors
    res = client.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    assert "Preview perplexity" in res[0]


def test_sessions_do_not_see_each_other(app_url):
    from gradio_client import Client

    a, b = Client(app_url, verbose=False), Client(app_url, verbose=False)
    _load(a)
    _load(b)
    a.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    res = b.predict(api_name="/on_clear")
    assert "Empty plan" in res[0]
    res = a.predict('{"drop_experts": {"1": [3]}}', api_name="/on_json")
    assert '"1"' in res[1] and "Preview perplexity" in res[0]


def test_distill_and_export(client, tmp_path):
    _load(client)
    client.predict('{"drop_experts": {"0": [1, 2], "1": [0, 5]}}', api_name="/on_json")
    status, fig = client.predict(8, 1e-3, 1.0, "forward", "all", 4, api_name="/on_distill")
    assert "done" in status and "best" in status
    msg, _ = client.predict(str(tmp_path / "exp"), False, api_name="/on_export")
    assert "Written to" in msg
    assert {"plan.json", "summary.json", "config.json"} <= {p.name for p in (tmp_path / "exp").iterdir()}
    msg, f = client.predict(api_name="/on_zip")
    assert f and str(f).endswith(".zip")


@pytest.mark.browser
def test_in_a_real_browser(app_url, tmp_path, chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.get_by_text("Perplexity (evaluation)").wait_for(timeout=120_000)  # loaded and statistics collected
        _idle(page)
        page.screenshot(path=str(tmp_path / "1-model.png"), full_page=True)
        page.get_by_role("tab", name="Routing").click()
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        page.get_by_role("button", name="Show routing", exact=True).click()
        page.locator(".token-strip").wait_for(timeout=30_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "2-routing.png"), full_page=True)
        page.get_by_role("tab", name="Saliency").click()
        page.get_by_role("button", name="Score experts", exact=True).click()
        page.wait_for_timeout(1000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "3-saliency.png"), full_page=True)
        page.get_by_role("tab", name="Plan").click()
        page.locator('[data-testid="cell-1-3"]').wait_for(timeout=30_000)
        before = page.locator("body").inner_text()
        assert "Empty plan" in before
        for row, col in ((1, 3), (2, 5)):  # drop two experts by clicking their cells
            page.locator(f'[data-testid="cell-{row}-{col}"]').click()
            page.wait_for_timeout(2000)
        page.get_by_text("Preview perplexity").wait_for(timeout=60_000)
        _idle(page)
        text = page.locator("body").inner_text()
        assert "Preview perplexity" in text and "Empty plan" not in text
        page.get_by_label("pick for a merge group").check()  # now pick two experts of layer 3 and merge them
        for col in (1, 2):
            page.locator(f'[data-testid="cell-3-{col}"]').click()
            page.wait_for_timeout(1000)
        page.get_by_text("Picked in layer 3").wait_for(timeout=30_000)
        page.get_by_role("button", name="Merge the picked experts", exact=True).click()
        page.get_by_text("experts per layer [8, 7, 7, 7]").wait_for(timeout=60_000)
        _idle(page)
        page.screenshot(path=str(tmp_path / "4-plan.png"), full_page=True)
        page.get_by_role("tab", name="Distill").click()
        page.get_by_label("steps").fill("12")
        page.get_by_label("evaluate every").fill("3")
        page.get_by_role("button", name="Start distillation", exact=True).click()
        page.get_by_text("done").first.wait_for(timeout=180_000)
        n_points = page.evaluate("""() => { const g = [...document.querySelectorAll('.js-plotly-plot')]
            .filter(d => d.offsetParent !== null).pop(); if (!g) return 0;
            const t = g.data.find(t => t.name === 'perplexity'); return t ? t.x.length : 0; }""")
        assert n_points >= 4  # the start plus one point per evaluation
        page.screenshot(path=str(tmp_path / "5-distill.png"), full_page=True)
        page.get_by_role("tab", name="Compare & export").click()
        page.get_by_label("export folder").fill(str(tmp_path / "browser-export"))
        page.get_by_role("button", name="Export to folder", exact=True).click()
        page.get_by_text("Written to").wait_for(timeout=120_000)
        page.screenshot(path=str(tmp_path / "6-export.png"), full_page=True)
        browser.close()
    assert (tmp_path / "browser-export" / "plan.json").exists()
    for f in sorted(tmp_path.glob("*.png")):
        print("screenshot:", f)
