"""One user's working state, in the parts it holds: the model, its data and statistics (``workspace``); the plan
being edited (``editor``); the plans tried, their task scores and distilled students, and the export (``trials``);
which server paths a shared app may touch (``access``); and the session saved to one file and opened again
(``files``: ``Session.save(path)``, ``Session.open(path)``).

The Gradio app keeps one ``Session`` per browser session and the notebook widgets one per explorer; both only
arrange controls around these methods, so they behave the same and nothing is computed in the UI layer.
"""
from __future__ import annotations

from pathlib import Path

from .access import Access
from .common import MAX_STUDENTS, METHODS, PRESETS, SessionError  # noqa: F401
from .editor import TABLE_SORTS, TABLE_VIEWS, PlanEditor  # noqa: F401
from .files import SessionFiles
from .trials import Trials
from .workspace import Workspace


class Session(Workspace, PlanEditor, Trials, Access, SessionFiles):
    def __init__(self, block_len: int = 128, max_tokens: int = 4096, out_root: str | Path | None = None,
                 untrusted: bool = False, allow_paths: list[str | Path] | None = None,
                 deny_paths: list[str | Path] | None = None):
        self._init_workspace(block_len, max_tokens)
        self._init_editor()
        self._init_trials()
        self._init_access(out_root, untrusted, allow_paths, deny_paths)

    def _forget_plans(self) -> None:
        self._init_editor()
        pareto_x = self.pareto_x  # the chart's size axis is a choice of the user's; task scores were the old model's
        self._init_trials()
        self.pareto_x = pareto_x

    def _forget_measurements(self) -> None:
        self._previews = {}
