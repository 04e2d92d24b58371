"""A shared app (--share, a non-loopback bind, or --untrusted) takes every field from strangers: no server path is
read or written outside what its owner allowed, and sessions cannot reach each other's files."""
import json
import time
from pathlib import Path

import pytest
from test_app import _load, launched_app


@pytest.fixture(scope="module")
def shared(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared-out")
    allowed = tmp_path_factory.mktemp("allowed")
    log = tmp_path_factory.mktemp("shared-app") / "app.log"
    with launched_app(out, log, "--untrusted", "--allow-paths", str(allowed)) as url:
        yield url, out, allowed


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_exports_stay_in_the_session_folder_or_an_allowed_one(shared, tmp_path):
    url, out, allowed = shared
    c = _client(url)
    _load(c)
    c.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    msg, _ = c.predict("../../../../elsewhere/x", False, api_name="/on_export")
    assert "climbs out of your session" in msg
    msg, _ = c.predict(str(tmp_path / "anywhere"), False, api_name="/on_export")
    assert "this app is shared" in msg and not (tmp_path / "anywhere").exists()
    msg, _ = c.predict(str(allowed / "mine"), False, api_name="/on_export")
    assert "Written to" in msg and (allowed / "mine" / "plan.json").exists()
    msg, _ = c.predict("mine", False, api_name="/on_export")
    written = Path(msg.split("`")[1])
    assert out in written.parents and len(written.parent.name) == 32  # a folder no other session can name


def test_model_and_data_fields_read_no_server_path(shared, tmp_path):
    url, out, allowed = shared
    c = _client(url)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----\n" + "x" * 400)
    answers = []
    for path in ("/etc", "/no/such/folder"):  # the same words whether the folder exists or not
        with pytest.raises(Exception) as err:
            c.predict(path, "cpu", "float32", "demo", None, 2048, api_name="/on_load")
        answers.append(str(err.value))
    assert all("this app is shared" in a for a in answers) and answers[0] == answers[1]
    _load(c)
    with pytest.raises(Exception, match="this app is shared"):
        c.predict(str(secret), None, 512, api_name="/on_data")


def test_downloads_are_private_and_do_not_pile_up(shared):
    url, out, _ = shared
    a, b = _client(url), _client(url)
    _load(a), _load(b)
    a.predict('{"drop_experts": {"0": [4, 5]}}', api_name="/on_json")
    b.predict('{"drop_experts": {"0": [4, 5]}}', api_name="/on_json")
    mine = {p.parent.parent.parent for p in out.glob("*/.plan/*/plan.json")
            if json.loads(p.read_text())["drop_experts"] == {"0": [4, 5]}}
    assert len(mine) == 2, mine  # the same plan, two files, each under its own session's folder
    assert all(len(list(m.glob(".plan/*/plan.json"))) == 1 for m in mine)  # one download per session
    assert not (Path("/tmp") / "moe-explorer-plans").exists() or not any(
        p.stat().st_mtime > time.time() - 60 for p in (Path("/tmp") / "moe-explorer-plans").rglob("*"))
    msg, z1 = a.predict(api_name="/on_zip")
    msg, z2 = a.predict(api_name="/on_zip")
    sess = next(p for p in out.iterdir() if (p / ".archive").exists() and list((p / ".archive").rglob("*.zip")))
    zips = list((sess / ".archive").rglob("*.zip"))
    assert len(zips) == 1  # the second archive replaced the first
    assert not list((sess / ".archive").rglob("config.json"))  # the unzipped export folder is gone
