"""What the session's parts share: its error, the presets and methods it offers, and how students are keyed."""
from __future__ import annotations

import json

from .. import planners
from ..errors import ExplorerError
from ..planners import preset_methods
from ..plan import Plan

PRESETS = tuple(planners.PRESETS)  # what ``preset`` makes: each operation module's preset
METHODS = preset_methods()  # the presets' method choices (merge and prune methods)
MAX_STUDENTS = 3  # distilled students kept per session (each is a copy of the cut model)


class SessionError(ExplorerError):
    """A user-facing problem: the message is shown as it is."""


def cut_key(plan: Plan) -> str:
    """What a plan cuts (not its notes, recipe or model fingerprint): two plans that cut alike share a student."""
    d = {k: v for k, v in plan.to_dict().items() if k not in ("notes", "recipe", "model")}
    return json.dumps(d, sort_keys=True)
