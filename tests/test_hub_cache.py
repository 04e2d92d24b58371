"""A model as the hub leaves it on disk (`hf download`, any hub id): a cache snapshot whose files are symlinks into
``../../blobs``. It loads like a folder, offline by its hub id too, and is cut out of core to the same model as in
memory; only links into its own blob store count as its files."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from explorer import load_model
from explorer.cli import main
from explorer.loading import DEMO_MODEL, ModelLoadError
from explorer.plan import Plan
from explorer.tiny import tiny_model

REPO = "explorer-test/tiny-moe"


def hub_cache(root: Path, revision: str = "0123456789abcdef0123456789abcdef01234567") -> tuple[Path, Path]:
    """(cache dir, snapshot folder) laid out as huggingface_hub lays them: blobs by content hash, the snapshot's
    files relative links to them, refs/main naming the revision. The weights are sharded (an index names them)."""
    download = root / "download"
    model = tiny_model("mixtral", seed=4, vocab_size=4096)
    model.save_pretrained(download, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(download)
    assert (download / "model.safetensors.index.json").exists()
    cache = root / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for f in sorted(download.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return cache, snap


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return hub_cache(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def offline(cached, monkeypatch):
    cache, snap = cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache, snap


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_a_snapshot_folder_loads_like_a_folder(cached):
    cache, snap = cached
    assert all(p.is_symlink() for p in snap.iterdir())
    model, tok, view = load_model(snap, device="cpu")
    assert len(view) == model.config.num_hidden_layers


def test_a_cached_hub_id_loads_offline(offline):
    cache, snap = offline
    by_id, _, _ = load_model(REPO, device="cpu")
    by_path, _, _ = load_model(snap, device="cpu")
    assert torch.equal(_logits(by_id), _logits(by_path))
    with pytest.raises(ModelLoadError, match="hub cache .* does not hold it"):
        load_model("explorer-test/not-cached", device="cpu")


def test_statistics_and_an_out_of_core_cut_of_a_cached_hub_id(offline, tmp_path, capsys):
    from explorer.apply import apply_plan

    cache, snap = offline
    assert main(["eval", REPO, "--max-tokens", "512"]) == 0
    assert "ppl" in capsys.readouterr().out.lower()
    assert main(["stats", REPO, "--max-tokens", "512", "--out", str(tmp_path / "stats.json")]) == 0
    plan = Plan(drop_experts={i: [1 + i] for i in range(3)}, merge={i: [[4, 5]] for i in range(3)})
    plan.to_json(tmp_path / "plan.json")
    code = main(["apply", REPO, str(tmp_path / "plan.json"), "--out-of-core", "--stats", str(tmp_path / "stats.json"),
                 "--out", str(tmp_path / "cut")])
    assert code == 0, capsys.readouterr().err
    cut, _, _ = load_model(tmp_path / "cut", device="cpu")
    model, _, view = load_model(snap, device="cpu")
    from explorer.stats import RouterStats

    new, _, _ = apply_plan(model, view, plan, stats=RouterStats.load_file(tmp_path / "stats.json"))
    assert torch.allclose(_logits(cut), _logits(new), atol=1e-5)
    assert not any(p.is_symlink() for p in (tmp_path / "cut").iterdir())  # the export holds files, not links


def test_only_links_into_its_own_blob_store_count_as_the_models_files(cached, tmp_path):
    from explorer.checkpoint import apply_checkpoint

    cache, snap = cached
    copy = snap.parent / "fedcba9876543210fedcba9876543210fedcba98"  # a second revision with one foreign link
    copy.mkdir()
    for f in snap.iterdir():
        os.symlink(os.readlink(f), copy / f.name)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    os.symlink(secret, copy / "notes.txt")
    out = apply_checkpoint(copy, Plan(drop_experts={i: [1] for i in range(3)}), tmp_path / "cut")
    assert not (out / "notes.txt").exists()
    assert "notes.txt" in json.loads((out / "summary.json").read_text())["not_copied"]
    assert (out / "tokenizer.json").exists()
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (copy / shard).unlink()
    os.symlink(secret, copy / shard)  # a shard that is a link outside the blob store
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        load_model(copy, device="cpu")
