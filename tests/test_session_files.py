"""A session in one file (issue 32): saved in the app or a notebook, opened in the other, with its statistics,
plans, measurements, task scores and distilled students; a file that is not a session, or does not fit its model,
is refused in words."""
import json
import zipfile

import numpy as np
import pytest
import torch

from explorer.distill import DistillConfig
from explorer.session import Session, SessionError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    s = Session(max_tokens=512)
    s.load()
    s.collect()
    s.preview(s.preset("drop-experts", 0.25))
    s.preview(s.preset("merge", 6))
    s.set_plan({"drop_experts": {"0": [1, 2]}})
    for _ in s.distill(DistillConfig(steps=4, eval_every=2, seed=0)):
        pass
    path = tmp_path_factory.mktemp("sessions") / "run.moe-session.zip"
    s.save(path)
    return s, path


def _rewritten(path, out, change):
    """A copy of the session file at ``path`` with ``change`` made to its session.json."""
    with zipfile.ZipFile(path) as z:
        meta = json.loads(z.read("session.json"))
        parts = {n: z.read(n) for n in z.namelist() if n != "session.json"}
    change(meta)
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("session.json", json.dumps(meta))
        for n, b in parts.items():
            z.writestr(n, b)
    return out


def test_a_saved_session_opens_with_everything_it_held(saved):
    s, path = saved
    t = Session.open(path, device="cpu")
    assert t.source == s.source and t.data_key == s.data_key
    for i in range(len(s.view)):
        assert np.array_equal(t.stats.load(i), s.stats.load(i))
    assert t.plan == s.plan
    assert [e["plan"] for e in t.tried] == [e["plan"] for e in s.tried]
    assert [round(e["ppl"], 9) for e in t.tried] == [round(e["ppl"], 9) for e in s.tried]
    assert not any(e["stale"] for e in t.compared())  # measured on the same text: they stand beside the original
    d0, d1 = s.student(), t.student()
    assert d1 is not None and d1.best_step == d0.best_step and d1.best_ppl == d0.best_ppl
    a, b = d0.final_model().state_dict(), d1.final_model().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "distilled" in t.export_what()


def test_a_file_that_is_not_a_session_is_refused_in_words(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "notes.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(SessionError, match="not a session saved by the explorer"):
        Session.open(bad)
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(SessionError, match="not a session saved by the explorer"):
        Session.open(tmp_path / "text.zip")
    # a plan that names an expert the model does not have
    broken = _rewritten(path, tmp_path / "broken.moe-session.zip",
                        lambda m: m["tried"][0]["plan"].__setitem__("drop_experts", {"0": [42]}))
    with pytest.raises(SessionError, match="does not fit.*expert 42 does not exist"):
        Session.open(broken)


def test_a_shared_app_opens_no_session_that_names_a_server_path(saved, tmp_path):
    _, path = saved
    other = _rewritten(path, tmp_path / "other.moe-session.zip", lambda m: m.__setitem__("source", "/etc/some-model"))
    with pytest.raises(SessionError, match="this app is shared"):
        Session.open(other, untrusted=True)


def test_a_session_on_text_files_reopens_where_they_are_gone(tmp_path):
    """Uploaded text (or a folder of .txt files) travels in the session file: reopened after the folder is gone,
    the session reads the same tokens, so its measurements stand; a file whose text names climb out of their
    folder is refused in words."""
    import shutil

    from explorer.assets import ASSETS

    folder = tmp_path / "my-text"
    folder.mkdir()
    corpus = sorted((ASSETS / "corpus").rglob("*.txt"))[:2]
    for i, f in enumerate(corpus):
        (folder / f"domain-{i + 1}.txt").write_bytes(f.read_bytes())
    s = Session(max_tokens=512)
    s.load()
    s.set_data(str(folder))
    s.collect()
    s.preview(s.preset("drop-experts", 0.25))
    path = s.save(tmp_path / "text.moe-session.zip")
    assert s.save_note == ""
    shutil.rmtree(folder)
    t = Session.open(path, device="cpu")
    assert t.data_key == s.data_key and t.data.eval.domains == ["domain-1", "domain-2"]
    assert t.data_source != str(folder) and t.data_uploaded and not any(e["stale"] for e in t.compared())
    shared = Session(max_tokens=512, untrusted=True)  # a shared app: its own copy of uploaded text stays readable
    shared.load()
    shared.set_data(t.data_source, uploaded=True)
    shared.load()  # another model: the text is read again, not refused as a server path
    assert shared.data_key == s.data_key
    climbing = _rewritten(path, tmp_path / "climb.moe-session.zip",
                          lambda m: m["text"].__setitem__("files", ["../escape.txt"]))
    with pytest.raises(SessionError, match="text files"):
        Session.open(climbing)
