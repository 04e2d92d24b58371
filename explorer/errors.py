"""The one base of every problem the explorer reports in words (the app and the CLI catch it and show the message).

Each module keeps its own subclass (PlanError, DataError, ...), and each is also a ValueError, as before, so code
that caught ValueError keeps working."""
from __future__ import annotations


class ExplorerError(ValueError):
    """A user-facing problem: bad input, an unsupported model, a refused plan. The message says what and why."""


class PlanError(ExplorerError):
    """A plan cannot be applied to this model; the message names the layer and the problem."""
