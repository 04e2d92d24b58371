import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer end-to-end tests (run by default; deselect with -m 'not slow')")
    config.addinivalue_line("markers", "browser: needs Debian's chromium and playwright")


@pytest.fixture(scope="session")
def demo():
    """The bundled demo model, its tokenizer and view (loaded once)."""
    from explorer import load_model
    from explorer.loading import DEMO_MODEL

    if not (DEMO_MODEL / "config.json").exists():
        pytest.skip("demo model asset not built yet")
    return load_model(device="cpu")


@pytest.fixture(scope="session")
def demo_data(demo):
    from explorer import load_data

    return load_data(demo[1], "demo", block_len=128, max_tokens=2048)


def demo_session(demo, max_tokens: int):
    """A Session on the demo model already loaded (``demo``), its demo text and statistics collected."""
    from explorer.session import Session

    s = Session(max_tokens=max_tokens)
    s.model, s.tok, s.view = demo
    s.source = "demo"
    s.set_data("demo")
    s.collect()
    return s


def moe_block_inputs(model, view, blocks) -> dict:
    """The input of every MoE block of ``view`` in one plain forward over ``blocks``: {MoE layer: [tensors]}."""
    import torch

    inputs: dict = {}
    hooks = [lay.block.register_forward_pre_hook(lambda m, a, _i=lay.index: inputs.setdefault(_i, []).append(a[0]))
             for lay in view]
    try:
        with torch.no_grad():
            model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask())
    finally:
        for h in hooks:
            h.remove()
    return inputs


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture()
def chromium_path():
    """Debian's chromium (the browser build Playwright downloads cannot be fetched here)."""
    import shutil

    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return path
