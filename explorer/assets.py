"""Where the bundled assets are: the demo model, its corpus and its tasks (beside the package, not inside it)."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL = ASSETS / "demo-moe"
