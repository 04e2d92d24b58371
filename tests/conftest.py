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
