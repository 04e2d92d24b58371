"""Who may name server paths: in a private app the person at the page owns the machine; in a shared one (--share,
or bound beyond loopback) every field comes from a stranger, so no server path is read or written unless the owner
listed it, and relative exports never climb out of the session's own folder."""
from __future__ import annotations

from pathlib import Path

from .common import SessionError


class Access:
    def _init_access(self, out_root, untrusted: bool, allow_paths, deny_paths=None) -> None:
        # relative export paths resolve here (the app gives each browser session its own), never the server's cwd
        self.out_root = Path(out_root) if out_root is not None else None
        self.untrusted = untrusted
        self.allow_paths = [Path(p).expanduser().resolve() for p in (allow_paths or [])]
        # folders strangers can write into (uploads, session folders): never a source of task files, even when an
        # allowed folder holds them
        self.deny_paths = [Path(p).expanduser().resolve() for p in (deny_paths or [])]

    def allowed(self, path: str | Path) -> bool:
        """Whether a server path may be read or written by this session: always in a private app; in a shared
        one only inside a folder the owner listed (``--allow-paths``)."""
        if not self.untrusted:
            return True
        try:
            p = Path(path).expanduser().resolve()
        except (RuntimeError, OSError, ValueError):  # ~nosuchuser, a NUL byte: no folder of the owner's
            return False
        return _under(p, self.allow_paths)

    def check_tasks(self, spec: str) -> None:
        """The task field of a shared app: the demo's tasks, lm-eval's tasks from a fixed list, or task files in a
        folder the owner allowed, and nothing a stranger could have written. A task file is a template, so this
        decides who may run one; the refusal is the same whether a path exists or not."""
        if not self.untrusted:
            return
        from ..tasks import SHARED_LM_EVAL_TASKS, demo_task_names, split_spec

        demo = demo_task_names()
        for part in split_spec(spec):
            if part == "demo" or part in demo or part in SHARED_LM_EVAL_TASKS:
                continue
            if isinstance(part, str) and self.allowed(part) and not _under(Path(part).resolve(), self.deny_paths):
                continue
            raise SessionError("this app is shared: its tasks are `demo`, the demo's own (" + ", ".join(demo) +
                               "), the lm-eval tasks " + ", ".join(SHARED_LM_EVAL_TASKS) +
                               ", or task folders its owner allowed (--allow-paths)")

    def task_roots(self) -> list[Path]:
        """Folders a task's data files may lie in besides the task's own: the owner's allowed folders when shared."""
        return list(self.allow_paths) if self.untrusted else []

    def check_source(self, source: str | None, what: str = "model") -> None:
        """A model or data field in a shared app: the demo, a hub id or an uploaded file; a server path only
        inside an allowed folder. The refusal says nothing about whether the path exists."""
        if not self.untrusted or source in (None, "", "demo") or str(source).startswith("hf:"):
            return
        text = str(source).strip()
        looks_local = text.startswith((".", "/", "~", "\\")) or text.count("/") > 1 or Path(text).exists()
        if looks_local and not self.allowed(text):
            raise SessionError(f"this app is shared: {what} paths on the server are not read unless its owner "
                               "allowed them (--allow-paths); " + ("upload the text instead" if what == "data" else
                                                                    "use the demo or a hub id"))

    def private_dir(self, kind: str) -> Path:
        """A fresh folder for this session's downloads or uploads of one ``kind``; the previous one of that kind
        is removed, so a session keeps one plan download, one archive and one set of uploads at a time."""
        import shutil
        import tempfile

        base = (self.out_root or Path(tempfile.gettempdir()) / "moe-explorer") / f".{kind}"
        if base.exists():
            shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def export_path(self, out_dir: str | Path | None) -> Path:
        """Where an export goes: an empty or relative path under ``out_root`` (never climbing out of it); an
        absolute one as given in a private app, and in a shared one only inside an allowed folder."""
        text = "" if out_dir is None else str(out_dir).strip()
        p = Path(text or "compressed").expanduser()
        if self.out_root is None:
            return p
        if p.is_absolute():
            if not self.allowed(p):
                raise SessionError("this app is shared: exports go to a folder name under your session's own folder "
                                   "(an absolute path needs the owner's --allow-paths)")
            return p
        root = self.out_root.resolve()
        target = (self.out_root / p).resolve()
        if target != root and root not in target.parents:
            raise SessionError(f"the export folder {text!r} climbs out of your session's folder; give a folder name "
                               "inside it")
        return self.out_root / p


def _under(p: Path, roots: list[Path]) -> bool:
    return any(p == a or a in p.parents for a in roots)
