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
    with launched_app(out, log, "--untrusted", "--allow-paths", str(allowed), "--max-upload-mb", "1") as url:
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


def _upload(url: str, name: str, data: bytes):
    """Gradio's own upload endpoint, as an attacker would call it: (HTTP status, the server paths it answered)."""
    import httpx

    r = httpx.post(url + "gradio_api/upload", files=[("files", (name, data))], timeout=60)
    return r.status_code, (r.json() if r.status_code == 200 else r.text)


def _refusal(c, api_name, *args):
    with pytest.raises(Exception) as err:
        c.predict(*args, api_name=api_name)
    return str(err.value)


def test_the_task_field_runs_no_strangers_file_and_says_nothing_of_paths(shared, tmp_path):
    """An uploaded task YAML whose template reaches Python, typed into either task field: refused, nothing runs; a
    server folder, a missing path and a demo name that climbs out get the very same words."""
    url, out, allowed = shared
    c = _client(url)
    _load(c)
    canary = tmp_path / "pwned"
    status, data = _upload(url, "items.jsonl", b'{"q": "a", "choices": ["b", "c"], "label": 0}\n' * 4)
    assert status == 200
    yaml_text = ("task: probe\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + data[0] +
                 "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{ lipsum.__globals__['os']"
                 ".system('id > " + str(canary) + "') }}{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: "
                 "label\n")
    status, data = _upload(url, "task.yaml", yaml_text.encode())
    assert status == 200
    uploaded = data[0]
    c.predict('{"drop_experts": {"0": [1]}}', api_name="/on_json")  # a plan, so the Plan tab's button scores
    climbing = "../../../../" + str(Path(uploaded).with_suffix("")).lstrip("/")
    answers = {}
    for spec in (uploaded, str(Path(uploaded).parent), "/etc", "/no/such/folder", "/etc/passwd.yaml", climbing,
                 f"demo,{uploaded}"):
        answers[spec] = _refusal(c, "/on_score_tasks", spec, 4)
        assert _refusal(c, "/on_score_plan_tasks", spec, 4) == answers[spec]
    assert not canary.exists()
    assert len(set(answers.values())) == 1, answers
    assert "this app is shared" in answers["/etc"] and "demo_next_word" in answers["/etc"]


def test_an_allowed_task_folder_reads_only_its_own_files(shared):
    url, out, allowed = shared
    c = _client(url)
    _load(c)
    folder = allowed / "tasks"
    folder.mkdir(exist_ok=True)
    items = "".join(json.dumps({"q": "In the beginning God created the", "choices": [" heaven", " keyboard"],
                                "label": 0}) + "\n" for _ in range(6))
    (folder / "items.jsonl").write_text(items)
    text = ("task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"{{{{q}}}}\"\ndoc_to_choice: \"{{{{choices}}}}\"\n"
            "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (folder / "leak.yaml").write_text(text.format(name="leak", data="/etc/passwd"))
    msg = _refusal(c, "/on_score_tasks", str(folder / "leak.yaml"), 4)
    assert "outside the task's folder" in msg
    (folder / "leak.yaml").unlink()
    (folder / "fine.yaml").write_text(text.format(name="fine", data="items.jsonl"))
    table, _, _ = c.predict(str(folder), 4, api_name="/on_score_tasks")
    assert any("fine" in h for h in table["headers"])


def test_uploads_and_prompts_are_bounded(shared):
    url, out, allowed = shared
    import uuid

    name = f"big-{uuid.uuid4().hex}.txt"  # its own name: gradio keeps other runs' uploads for an hour
    status, _ = _upload(url, name, b"x" * (2 * 2**20))  # the fixture's app takes at most 1 MiB
    assert status == 413
    from gradio.utils import get_upload_folder

    assert not list(Path(get_upload_folder()).rglob(name))  # nothing of it kept
    c = _client(url)
    _load(c)
    assert "at most 8 prompts" in _refusal(c, "/on_generate", "\n".join(f"p{i}" for i in range(9)), 8)
    assert "at most 512" in _refusal(c, "/on_generate", "word " * 2000, 8)


def test_a_session_on_uploaded_text_travels_with_its_text(shared, tmp_path):
    """Text uploaded to a shared app is carried in the saved session: it reopens in a notebook after the app's copy
    is gone, with the same tokens (its measurements stand), and opens in the app again."""
    import shutil

    from gradio_client import handle_file

    from explorer.assets import ASSETS
    from explorer.session import Session

    url, out, _ = shared
    c = _client(url)
    _load(c)
    files = []
    for name in ("code", "shakespeare"):
        f = tmp_path / f"{name}.txt"
        f.write_bytes((ASSETS / "corpus" / name / "calib.txt").read_bytes()[:300_000])
        files.append(handle_file(str(f)))
    c.predict("demo", files, 512, api_name="/on_data")
    summary = c.predict(api_name="/on_stats")[0]
    assert "domain-1, domain-2" in summary, summary
    c.predict('{"drop_experts": {"0": [1, 2]}}', api_name="/on_json")
    msg, f = c.predict(api_name="/on_save_session")
    assert "Saved: 1 plan(s)" in msg and "Note" not in msg, msg
    keep = tmp_path / "uploaded.moe-session.zip"
    shutil.copy(f, keep)
    for d in out.glob("*/.uploads"):  # the app's copies of the uploads go, as they do when its sessions end
        shutil.rmtree(d)
    nb = Session.open(keep, device="cpu")
    assert nb.data.eval.domains == ["domain-1", "domain-2"] and not any(e["stale"] for e in nb.compared())
    msg, table, _ = c.predict(handle_file(str(keep)), api_name="/on_open_session")
    assert "1 plan(s) tried" in msg and len(table["data"]) == 1, msg
