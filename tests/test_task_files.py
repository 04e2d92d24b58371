"""Task files are data: a template that reaches Python, a data file outside the task's folder, an alias bomb, a
demo task name that climbs out, a key that names code, and out-of-range arguments are refused in words; nothing runs.
Each case here ran code, read a file or took minutes before task files were checked (see issue 28)."""
import json
import os
import time
from pathlib import Path

import pytest

from explorer.cli import main
from explorer.assets import ASSETS

pytest.importorskip("lm_eval")

ITEMS = [{"q": "In the beginning God created the", "choices": [" heaven", " keyboard"], "label": 0}] * 4


def _task_folder(root: Path, yaml_text: str, name: str = "t") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    (folder / "task.yaml").write_text(yaml_text)
    return folder


def _yaml(doc_to_text: str = "{{q}}", data: str = "items.jsonl", extra: str = "") -> str:
    return ("task: probe\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + json.dumps(data) +
            "\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: " + json.dumps(doc_to_text) +
            "\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n" + extra)


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _canary_template(canary: Path) -> str:
    return "{{ lipsum.__globals__['os'].system('id > " + str(canary) + "') }}{{q}}"


def test_a_template_that_reaches_python_is_refused_by_the_cli(tmp_path, capsys):
    canary = tmp_path / "pwned"
    folder = _task_folder(tmp_path, _yaml(_canary_template(canary)))
    code, out, err = _cli(capsys, "eval", "demo", "--tasks", folder, "--no-perplexity", "--limit", 2)
    assert code != 0 and ("lipsum" in err or "__globals__" in err) and "document's" in err
    assert not canary.exists()


@pytest.mark.parametrize("template, what", [
    ("{{ ''.__class__.__mro__ }}", ".__mro__"),
    ("{{ q|attr('__class__') }}", "attr"),
    ("{{ cycler }}", "cycler"),
    ("{{ joiner.__init__ }}", "__init__"),
    ("{{ q['__class__'] }}", "__class__"),
    ("{% import 'os' as o %}{{q}}", "import"),
    ("{{ namespace() }}", "namespace"),
    ("{{ q", "not a valid template"),
])
def test_templates_beyond_the_documents_fields_are_refused(tmp_path, template, what):
    from explorer.tasks import resolve

    folder = _task_folder(tmp_path, _yaml(template))
    with pytest.raises(Exception, match="probe") as err:
        resolve(str(folder))
    assert what in str(err.value)


def test_templates_of_real_tasks_still_pass(tmp_path):
    from explorer.tasks import resolve

    for i, t in enumerate(["{{q}}", "Question: {{q|trim}}\\nAnswer:", "{{choices[0]}} or {{choices[1]}}",
                           "{% if q %}{{q}}{% endif %}", "{{ choices.index(' heaven') }}",
                           "{% for c in choices %}{{loop.index}}. {{c}}\\n{% endfor %}"]):
        cfg = resolve(str(_task_folder(tmp_path, _yaml(t), f"ok{i}")))[0]
        assert cfg["doc_to_text"] == t


def test_lm_eval_renders_in_the_sandbox(tmp_path):
    """A template that slipped past the check still cannot reach Python: lm-eval's renderer is the sandbox."""
    import jinja2.sandbox
    import lm_eval.utils

    from explorer.tasks import require_lm_eval

    require_lm_eval()
    canary = tmp_path / "pwned"
    with pytest.raises(jinja2.sandbox.SecurityError):
        lm_eval.utils.apply_template(_canary_template(canary), {"q": "x"})
    assert not canary.exists()
    # the demo's own templates render as lm-eval's unsandboxed environment renders them
    doc = {"context": "In the beginning", "choices": [" God", " keyboard"], "target": "God"}
    plain = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    for t in ("{{context}}", "{{choices}}", "{{target}}"):
        assert lm_eval.utils.apply_template(t, doc) == plain.from_string(t).render(**doc)


def test_a_data_file_outside_the_tasks_folder_is_refused(tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for i, data in enumerate(["/etc/passwd", "../secret.txt", str(secret)]):
        folder = _task_folder(tmp_path, _yaml(data=data), f"out{i}")
        code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", folder)
        assert code != 0 and "outside the task's folder" in err, (data, err)
    folder = _task_folder(tmp_path, _yaml(data="link.jsonl"), "symlinked")
    os.symlink(secret, folder / "link.jsonl")  # a link beside the YAML that points elsewhere
    code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", folder)
    assert code != 0 and "outside the task's folder" in err
    # data_files given as one string or a list is checked the same way
    text = _yaml().replace("data_files:\n    test: \"items.jsonl\"", "data_files: /etc/passwd")
    code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", _task_folder(tmp_path, text, "str"))
    assert code != 0 and "outside the task's folder" in err


def test_an_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 8)]
    folder = _task_folder(tmp_path, _yaml() + "\n".join(lines) + "\n")
    t0 = time.perf_counter()
    code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", folder)
    assert code != 0 and "aliases" in err
    assert time.perf_counter() - t0 < 60  # before: 236 s and 1.6 GiB to expand it


@pytest.mark.parametrize("extra, said", [
    ("process_docs: !function utils.process\n", "!function"),
    ("process_results: utils.score\n", "process_results"),
    ("include: /etc/some_task.yaml\n", "include"),
    ("unsafe_code: true\n", "unsafe_code"),
])
def test_keys_that_name_code_are_refused(tmp_path, capsys, extra, said):
    folder = _task_folder(tmp_path, _yaml(extra=extra))
    code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", folder)
    assert code != 0 and said in err


def test_metrics_and_filters_come_from_lm_evals_own_lists(tmp_path, capsys):
    """An unknown metric name reaches ``evaluate.load``, which runs a local script of that name."""
    script = tmp_path / "evil_metric.py"
    script.write_text("open(__file__ + '.ran', 'w').write('x')\n")
    text = _yaml().replace("- metric: acc", f"- metric: {script}")
    code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", _task_folder(tmp_path, text, "m"))
    assert code != 0 and "built-in metrics" in err and not Path(str(script) + ".ran").exists()
    text = _yaml(extra="filter_list:\n  - name: f\n    filter:\n      - function: custom\n")
    code, out, err = _cli(capsys, "eval", tmp_path / "no-model", "--tasks", _task_folder(tmp_path, text, "f"))
    assert code != 0 and "filter function 'custom'" in err


def test_a_demo_task_name_never_climbs_out(tmp_path):
    """A name is looked up among the demo's tasks, never joined onto its folder as a path."""
    from explorer.tasks import TaskError, check, resolve

    canary = tmp_path / "pwned"
    _task_folder(tmp_path, _yaml(_canary_template(canary)), "climb")
    target = (tmp_path / "climb" / "task").resolve()
    climbing = os.path.relpath(target, (ASSETS / "tasks").resolve())
    assert climbing.startswith("..")
    assert resolve(climbing) == [climbing]  # an lm-eval name, not a file read
    with pytest.raises(TaskError, match="unknown lm-eval task"):
        check(resolve(climbing))
    assert not canary.exists()


def test_argument_ranges_are_checked(tmp_path, capsys):
    for args in (["--num-fewshot", "-1"], ["--task-batch-size", "0"], ["--limit", "-3"], ["--limit", "nan"]):
        with pytest.raises(SystemExit) as e:
            main(["eval", "demo", "--tasks", "demo", *args])
        assert e.value.code == 2
        assert "must be" in capsys.readouterr().err
    code, out, err = _cli(capsys, "eval", "demo", "--tasks", "", "--no-perplexity")
    assert code != 0 and "no tasks given" in err
    code, out, err = _cli(capsys, "eval", "demo", "--tasks", " , ", "--no-perplexity")
    assert code != 0 and "no tasks given" in err


def test_generation_prompts_are_checked_before_any_runs(tmp_path, capsys):
    from explorer.plan import Plan

    Plan(drop_experts={0: [1]}).to_json(tmp_path / "p.json")
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv holds for Latin-1 bytes
    code, out, err = _cli(capsys, "preview", tmp_path / "no-model", tmp_path / "p.json", "--generate", bad)
    assert code != 0 and "not valid UTF-8" in err
    code, out, err = _cli(capsys, "preview", "demo", tmp_path / "p.json", "--generate", "def f(",
                          "--max-new-tokens", "5000")
    assert code != 0 and "positions" in err and "before:" not in out  # refused before any perplexity ran


def test_a_task_folder_still_runs(tmp_path, capsys, monkeypatch):
    """The checks keep a plain task of data working, from another folder."""
    folder = _task_folder(tmp_path, _yaml())
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(capsys, "eval", "demo", "--tasks", folder, "--no-perplexity")
    assert code == 0, err
    assert "probe" in out and "(n=4)" in out
