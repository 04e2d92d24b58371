"""JupyterLab started headless on 127.0.0.1, a notebook opened and run in Debian's chromium, the widget seen."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from conftest import CHROMIUM_ARGS

ROOT = Path(__file__).resolve().parent.parent


def _click_cell(page, expert: int, layer: int) -> None:
    """A real mouse click on heatmap cell (expert, layer), at the pixel plotly draws it."""
    x, y = page.evaluate("""([e, l]) => { const g = document.querySelector('.jp-OutputArea .js-plotly-plot');
        const fl = g._fullLayout, r = g.getBoundingClientRect();
        return [r.left + fl._size.l + fl.xaxis.l2p(e), r.top + fl._size.t + fl.yaxis.l2p(l)]; }""", [expert, layer])
    page.wait_for_timeout(1500)  # the previous click's redraw settles
    page.mouse.move(x, y)  # plotly reports a click on the point it hovers: hover first
    page.wait_for_timeout(500)
    page.mouse.click(x, y)


def _lab(tmp_path, chromium_path, source: str, clicks, check=None) -> None:
    """JupyterLab on a notebook whose one cell runs ``explore(source)``; the widget's load heatmap clicked at
    ``clicks`` [(expert, layer)], each click's marker seen, a screenshot kept; ``check(page)`` then looks further."""
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from explorer.widgets import explore\n"
        f"ex = explore({source}, max_tokens=1024)\n"
        "ex.selected_index = 0\n"
        "ex")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "widget.ipynb")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
                             "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={tmp_path}",
                             "--LabApp.news_url=", "--allow-root", "--LabApp.extension_manager=readonly"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "lab.log", "w"))
    try:
        url = f"http://127.0.0.1:{port}/lab/tree/widget.ipynb"
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp_path / "lab.log").read_text()[-2000:])
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=90_000)
            page.wait_for_timeout(3000)  # the kernel starts
            page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")
            page.locator(".jp-OutputArea .js-plotly-plot").first.wait_for(timeout=240_000)
            page.wait_for_timeout(2000)
            assert page.locator(".jp-OutputArea .widget-tab, .jp-OutputArea .lm-TabBar").count() >= 1
            # click cells of the load heatmap: each click must reach the kernel and add an x marker
            for n, (expert, layer) in enumerate(clicks, start=1):
                _click_cell(page, expert, layer)
                page.wait_for_function(f"() => {{ const g = document.querySelector('.jp-OutputArea .js-plotly-plot');"
                                       f" return g && g.data.length > 1 && g.data[1].x.length === {n}; }}",
                                       timeout=60_000)
            page.screenshot(path=str(tmp_path / "jupyterlab-widget.png"), full_page=True)
            if check is not None:
                check(page)
            browser.close()
        print("screenshot:", tmp_path / "jupyterlab-widget.png")
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.browser
@pytest.mark.slow
def test_widget_renders_in_jupyterlab(tmp_path, demo, chromium_path):
    _lab(tmp_path, chromium_path, "None", [(3, 1), (5, 2)])


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("name,layers,clicks", [("qwen3-30b-a3b", 48, [(100, 40), (7, 3)]), ("deepseek-v3", 58, [])])
def test_widget_at_real_size_in_jupyterlab(name, layers, clicks, tmp_path, chromium_path):
    """Qwen3-30B-A3B's 48 x 128 and DeepSeek-V3's 58 MoE layers x 256 routing shapes at a tiny width: the
    heatmap's axes are labelled every so often, its rows tall enough to hit, and a click on an expert deep in the
    grid reaches the kernel like one on the demo (DeepSeek-V3's grouped routing refuses a single drop, in words)."""
    from transformers import AutoTokenizer

    from explorer.loading import DEMO_MODEL
    from explorer.tiny import real_shape_model

    folder = tmp_path / name
    real_shape_model(name, vocab_size=4096).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)

    def check(page):
        heat = page.locator(".jp-OutputArea .js-plotly-plot").first
        assert 2 <= heat.locator(".xtick").count() <= 12 and heat.bounding_box()["height"] >= 12 * layers
        if not clicks:  # grouped routing keeps a multiple of its 8 groups: the click is answered in words
            _click_cell(page, 200, 50)
            page.get_by_text("grouped routing needs the kept count divisible by n_group=8").wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "jupyterlab-widget-refused.png"), full_page=True)

    _lab(tmp_path, chromium_path, repr(str(folder)), clicks, check)
