"""A session in one file: the model it ran on, its text, statistics, the plan in force, every plan tried with its
measurements and task scores, and the distilled students' weights; saved from the app or a notebook, opened in
either.

The file is a zip of data only: ``session.json`` (read by ``json``), ``stats.npz`` (``np.load`` without pickle),
``students/N.safetensors`` and, when the text came from files (an upload, a folder), those ``.txt`` files under
``text/``, so the session reopens where they do not exist. Opening it loads the model from the source it names (so
a session from a shared app opens only where that source is: the demo, a hub id, a folder the app allows), checks
every plan against the model, and rebuilds each student from its plan before loading its weights.
"""
from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

from ..errors import ExplorerError
from .common import SessionError, cut_key

FORMAT = "moe-explorer-session"
VERSION = 1
SUFFIX = ".moe-session.zip"
MAX_JSON = 64 << 20  # bytes of session.json: plans and numbers, not weights
MAX_TEXT = 64 << 20  # bytes of text files carried in a session (a shared app's largest upload)


class SessionFileError(SessionError):
    """Not a session file written by the explorer, or one whose parts do not fit its model."""


class SessionFiles:
    def save(self, path: str | Path) -> Path:
        """Write this session to ``path`` (a zip, all or nothing); returns the path."""
        from safetensors.torch import save as st_save

        from ..outputs import atomic_write

        self.require(stats=True)
        students, blobs = [], {}
        for i, d in enumerate(d for d in self.students.values() if d.best_step > 0 and d.best_state is not None):
            blobs[f"students/{i}.safetensors"] = st_save({k: v.contiguous() for k, v in d.best_state.items()})
            students.append({"file": f"students/{i}.safetensors", "plan": d.plan.to_dict(),
                             "config": dataclasses.asdict(d.config), "best_ppl": d.best_ppl, "best_step": d.best_step,
                             "step": d.step, "tokens": d.tokens, "initial_ppl": d.initial_ppl, "elapsed": d.elapsed,
                             "history": [e.to_dict() for e in d.history if e.kind != "step"]})
        from ..assets import DEMO_MODEL

        source = "demo" if self.source == str(DEMO_MODEL) else self.source
        text, text_note = _text_files(self.data_source)
        blobs.update({f"text/{name}": data for name, data in text.get("files", {}).items()})
        meta = {"format": FORMAT, "version": VERSION, "source": source, "data_source": self.data_source,
                "block_len": self.block_len, "max_tokens": self.max_tokens, "data_key": self.data_key,
                "plan": self.plan.to_dict(), "tried": self.tried, "pareto_x": self.pareto_x,
                "task_key": list(self.task_key) if self.task_key else None, "base_scores": self.base_scores,
                "plan_tasks": self.plan_tasks, "students": students,
                "text": {k: v for k, v in text.items() if k != "files"} | {"files": sorted(text.get("files", {}))}
                if text else None, "text_note": text_note}
        stats = io.BytesIO()
        _save_stats(self.stats, stats)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("session.json", json.dumps(meta, default=float, indent=1))
            z.writestr("stats.npz", stats.getvalue())
            for name, data in blobs.items():
                z.writestr(name, data)
        atomic_write(path, buf.getvalue())
        self.save_note = text_note  # said beside the saved file where the text could not travel with it
        return Path(path)

    @classmethod
    def open(cls, path: str | Path, device: str | None = None, **session_kw):
        """A new session restored from ``path`` (``Session.open("run.moe-session.zip")`` in a notebook)."""
        s = cls(**session_kw)
        s.restore(path, device=device)
        return s

    def restore(self, path: str | Path, device: str | None = None) -> dict:
        """Load the file's model and text, then its statistics, plans, measurements and students, into this
        session (what was here before goes). Refused in words, with nothing half-restored, when the file is not a
        session, names a source this session may not read, or holds plans that do not fit the model."""
        from ..plan import Plan

        meta, stats_bytes, read = _read(Path(path))
        self.check_source(meta["source"], "model")
        text = meta.get("text")
        if not text:  # the demo, a hub dataset, or text too large to carry: read where the file names it
            self.check_source(meta["data_source"], "data")
        self.block_len, self.max_tokens = int(meta["block_len"]), int(meta["max_tokens"])
        if text:  # the session's own copy of its text, as an upload is
            self.data_source, self.data_uploaded = _unpack_text(text, read, self.private_dir("uploads")), True
        else:
            self.data_source, self.data_uploaded = meta["data_source"], False
        self.load(meta["source"], device=device)
        if self.data_key != meta["data_key"]:
            raise SessionFileError(f"the evaluation text of {meta['data_source']!r} is not the text the session was "
                                   "measured on (its file or the corpus changed); its numbers would not compare")
        try:
            stats = _load_stats(stats_bytes).check_fits(self.view)
            plans = [Plan.from_dict(meta["plan"]).validate(self.view)]
            plans += [Plan.from_dict(e["plan"]).validate(self.view) for e in meta["tried"]]
            plans += [Plan.from_dict(st["plan"]).validate(self.view) for st in meta["students"]]
        except (ExplorerError, ValueError, KeyError, TypeError) as err:
            raise SessionFileError(f"{Path(path).name} does not fit {self.source}: {err}") from err
        self.stats, self.base = stats, None
        self.set_plan(plans[0])
        self.tried = [dict(e) for e in meta["tried"]]
        self.pareto_x = meta.get("pareto_x") or "params"
        self.task_key = tuple(meta["task_key"]) if meta.get("task_key") else None
        self.base_scores, self.plan_tasks = meta.get("base_scores"), dict(meta.get("plan_tasks") or {})
        for st in meta["students"]:
            self._restore_student(st, read(st["file"]))
        return {"plans": len(self.tried), "students": len(meta["students"]), "source": self.source}

    def _restore_student(self, st: dict, blob: bytes) -> None:
        from safetensors.torch import load as st_load

        from ..distill import DistillConfig, DistillEvent, Distiller
        from ..plan import Plan

        plan = Plan.from_dict(st["plan"])
        d = Distiller.from_plan(self.model, self.view, plan, self.data.calib, self.data.eval,
                                DistillConfig(**st["config"]), stats=self.stats)
        state = st_load(blob)
        have = d.student.state_dict()
        if state.keys() != have.keys() or any(state[k].shape != have[k].shape for k in state):
            raise SessionFileError(f"the student of {plan.describe()!r} does not fit the model its plan makes")
        d.student.load_state_dict(state)
        d.best_state = state
        d.best_ppl, d.best_step, d.step = st["best_ppl"], int(st["best_step"]), int(st["step"])
        d.tokens, d.initial_ppl, d.elapsed = int(st["tokens"]), st["initial_ppl"], float(st["elapsed"])
        d.history = [DistillEvent(**e) for e in st["history"]]
        self.students[cut_key(plan)] = d


def _text_files(source: str) -> tuple[dict, str]:
    """The text files a local data source reads ({"kind": "file" | "folder", "name", "files": {relative name:
    bytes}}), and a note where they are not carried (none for the demo and hub datasets, which are read again)."""
    if source in (None, "", "demo") or str(source).startswith("hf:"):
        return {}, ""
    path = Path(source).expanduser()
    if path.is_file():
        files = {path.name: path}
    elif path.is_dir():
        files = {f.name: f for f in sorted(path.glob("*.txt"))}
        files |= {f"{d.name}/{f.name}": f for d in sorted(p for p in path.iterdir() if p.is_dir())
                  for f in sorted(d.glob("*.txt"))}
    else:
        return {}, f"the text {source} was not found when saving: the session reopens only where it exists"
    size = sum(f.stat().st_size for f in files.values())
    if size > MAX_TEXT:
        return {}, (f"the text {source} ({size:,} bytes) is larger than a session carries ({MAX_TEXT:,}): the "
                    "session reopens only where it exists")
    return {"kind": "file" if path.is_file() else "folder", "name": path.name,
            "files": {name: f.read_bytes() for name, f in files.items()}}, ""


def _unpack_text(text: dict, read, folder: Path) -> str:
    """Write a session's text files into ``folder`` (names checked: one level of sub-folder at most, no climbing
    out); the data source to read them from."""
    import re

    safe = re.compile(r"^[^/\\.][^/\\]*(/[^/\\.][^/\\]*)?$")
    names = text.get("files") or []
    if text.get("kind") not in ("file", "folder") or not names or any(not safe.match(str(n)) for n in names):
        raise SessionFileError("the session's text files are named in a way the explorer does not write")
    for name in names:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read(f"text/{name}"))
    return str(folder / names[0]) if text["kind"] == "file" else str(folder)


def _save_stats(stats, buf: io.BytesIO) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "stats.npz"
        stats.save(f)
        buf.write(f.read_bytes())


def _load_stats(data: bytes):
    import tempfile

    from ..stats import RouterStats

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "stats.npz"
        f.write_bytes(data)
        return RouterStats.load_file(f)


def _read(path: Path):
    """(session.json as a dict, stats.npz's bytes, a reader of the other members): only the names a session
    holds, each read with a size bound; anything else is refused in words."""
    if not path.is_file():
        raise SessionFileError(f"session file not found: {path}")
    try:
        z = zipfile.ZipFile(path)
        names = set(z.namelist())
        if "session.json" not in names or "stats.npz" not in names:
            raise SessionFileError(f"{path.name} is not a session saved by the explorer (no session.json / stats.npz)")
        info = z.getinfo("session.json")
        if info.file_size > MAX_JSON:
            raise SessionFileError(f"{path.name}: session.json is {info.file_size:,} bytes, more than a session holds")
        meta = json.loads(z.read("session.json").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError, OSError) as err:
        raise SessionFileError(f"{path.name} is not a session saved by the explorer ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SessionFileError(f"{path.name} is not a session saved by the explorer")
    if meta.get("version") != VERSION:
        raise SessionFileError(f"{path.name} is a session file of version {meta.get('version')}; this explorer reads "
                               f"version {VERSION}")
    files = {st.get("file") for st in meta.get("students", [])}
    if not files <= names or any(not str(f).startswith("students/") for f in files):
        raise SessionFileError(f"{path.name}: its students name files it does not hold")
    text = meta.get("text") or {}
    if not {f"text/{n}" for n in text.get("files", [])} <= names:
        raise SessionFileError(f"{path.name}: it names text files it does not hold")
    if sum(z.getinfo(f"text/{n}").file_size for n in text.get("files", [])) > MAX_TEXT:
        raise SessionFileError(f"{path.name}: its text is larger than a session carries ({MAX_TEXT:,} bytes)")

    def read(name: str) -> bytes:
        return z.read(name)
    return meta, z.read("stats.npz"), read
