"""The app at real models' routing shapes, in a real browser: Qwen3-30B-A3B (48 MoE layers x 128 experts, top-8)
and DeepSeek-V3 (3 dense + 58 MoE layers x 256 routed experts, 8 groups), built at a tiny width with the demo's
tokenizer. Each tab is screenshotted (kept in the test's folder); the checks are what stops being readable at this
size: axes that label every one of 256 experts, a load table of 256 columns, a vocabulary chart of every expert."""
import time
from pathlib import Path

import pytest
from test_app import _idle, launched_app

from explorer.figures import EVERY_TICK


def _saved(name: str, folder: Path) -> Path:
    from transformers import AutoTokenizer

    from explorer.loading import DEMO_MODEL
    from explorer.tiny import real_shape_model

    real_shape_model(name, vocab_size=4096).save_pretrained(folder)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(folder)
    return folder


def _tick_labels(page, index: int) -> int:
    """How many x-axis tick labels the ``index``-th plot draws."""
    return page.locator(".js-plotly-plot").nth(index).locator(".xtick").count()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("name,layers,experts", [("qwen3-30b-a3b", 48, 128), ("deepseek-v3", 58, 256)])
def test_the_app_stays_readable_at_real_size(name, layers, experts, tmp_path, chromium_path):
    from playwright.sync_api import sync_playwright

    from conftest import CHROMIUM_ARGS

    folder = _saved(name, tmp_path / name)
    with launched_app(tmp_path / "out", tmp_path / "app.log", "--model", str(folder)) as url:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            t = time.perf_counter()
            page.goto(url)
            page.get_by_text("Perplexity (evaluation)").wait_for(timeout=600_000)  # model, statistics, perplexity
            first_screen = time.perf_counter() - t
            print(f"\n{name}: first useful screen (model loaded, statistics and perplexity shown) after "
                  f"{first_screen:.0f} s on this machine")
            body = page.locator("body").inner_text()
            assert f"{layers} MoE layers" in body and f"experts per layer {experts}" in body
            page.screenshot(path=str(tmp_path / "1-model.png"), full_page=True)

            page.get_by_role("tab", name="Routing").click()
            page.locator(".js-plotly-plot .xtick").first.wait_for(timeout=60_000)
            _idle(page)
            page.screenshot(path=str(tmp_path / "2-routing.png"), full_page=True)
            heat = _tick_labels(page, 0)
            assert 2 <= heat <= 12, heat  # labelled every so often, not all 256 on top of each other
            assert all(_tick_labels(page, i) <= EVERY_TICK for i in range(page.locator(".js-plotly-plot").count()))
            height = page.locator(".js-plotly-plot").first.bounding_box()["height"]
            assert height >= 12 * layers, height  # a row per layer that can be hovered
            vocab = page.locator(".js-plotly-plot").last.inner_text()
            assert f"of {experts} experts" in vocab  # the vocabulary chart shows a chosen few experts, and says so

            page.get_by_role("tab", name="Plan").click()
            page.locator('[data-testid="cell-0-0"]:visible').wait_for(timeout=60_000)
            # one layer, a row per expert (auto beyond 32 experts): 5 columns, not 257
            header = page.locator("thead").filter(visible=True).first.inner_text()
            assert "expert" in header and "REAP" in header and "e200" not in header
            loads = [float(page.locator(f'[data-testid="cell-{r}-1"]:visible').inner_text()) for r in range(4)]
            page.get_by_label("order (one layer)").click()
            page.locator("[role=option]", has_text="most load").click()
            _idle(page)
            page.wait_for_function("(v) => [...document.querySelectorAll('[data-testid=\"cell-0-1\"]')].some("
                                   "e => e.offsetParent !== null && parseFloat(e.innerText) > v)", arg=max(loads),
                                   timeout=30_000)  # the busiest expert of the layer comes first
            loads = [float(page.locator(f'[data-testid="cell-{r}-1"]:visible').inner_text()) for r in range(4)]
            assert loads == sorted(loads, reverse=True) and loads[0] > 1.0, loads
            busiest = page.locator('[data-testid="cell-0-0"]:visible').inner_text()
            page.locator('[data-testid="cell-0-1"]:visible').click()  # a click on the row: that expert
            _idle(page)
            page.wait_for_timeout(500)
            page.screenshot(path=str(tmp_path / "3-plan.png"))
            text = page.locator("body").inner_text()
            state = page.locator('[data-testid="cell-0-4"]:visible').inner_text()
            print(f"{name}: after a click on expert {busiest}: {state}; message: "
                  f"{text.split('Empty plan')[0][-300:]!r}")
            if name == "deepseek-v3":  # grouped routing keeps a multiple of its 8 groups: one drop is refused
                assert state == "kept" and "grouped routing needs the kept count divisible by n_group=8" in text
            else:
                assert state == "dropped", state
                assert busiest in text.split('"drop_experts"', 1)[1][:120]  # the plan's JSON names it
            browser.close()
