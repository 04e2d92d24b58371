"""Calibration and evaluation text, tokenised once into fixed-length blocks, by domain.

Sources: "demo" (the bundled four-domain corpus: its calib and eval splits), a local .txt file or a folder
(each .txt file, or each sub-folder of .txt files, is a domain), or "hf:NAME[:CONFIG[:SPLIT]]" for a Hugging Face
dataset where there is a network. Calibration and evaluation never share a block.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
import os
from pathlib import Path

import torch

from .errors import ExplorerError
from .assets import ASSETS

CORPUS = ASSETS / "corpus"


class DataError(ExplorerError):
    """Text could not be loaded or is unusable; the message says why."""


@dataclass
class TokenBlocks:
    """Blocks of token ids [N, L]; ``lengths`` real tokens per block (the rest is padding, never scored)."""

    input_ids: torch.Tensor
    lengths: torch.Tensor
    domain: torch.Tensor
    domains: list[str]
    n_bytes: torch.Tensor
    block_len: int
    pad_id: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        """Scored tokens: every real token but the first of each block."""
        return int((self.lengths - 1).clamp_min(0).sum())

    def attention_mask(self) -> torch.Tensor:
        return (torch.arange(self.block_len)[None, :] < self.lengths[:, None]).long()

    def subset(self, idx) -> "TokenBlocks":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TokenBlocks(self.input_ids[idx], self.lengths[idx], self.domain[idx], self.domains,
                           self.n_bytes[idx], self.block_len, self.pad_id)

    def limit(self, max_tokens_per_domain: int | None) -> "TokenBlocks":
        """The first blocks of each domain up to a token budget (same blocks every time)."""
        if not max_tokens_per_domain:
            return self
        keep = []
        for d in range(len(self.domains)):
            rows = (self.domain == d).nonzero().flatten().tolist()
            n = max(1, max_tokens_per_domain // self.block_len)
            keep += rows[:n]
        return self.subset(sorted(keep))

    def spread(self, max_tokens: int) -> "TokenBlocks":
        """About ``max_tokens`` worth of blocks taken in turn from each domain (the first blocks of one domain
        would judge every expert by one kind of text)."""
        n = max(1, max_tokens // self.block_len)
        rows = [(self.domain == d).nonzero().flatten().tolist() for d in range(len(self.domains))]
        pick = [r[i] for i in range(max(map(len, rows), default=0)) for r in rows if i < len(r)][:n]
        return self.subset(sorted(pick))

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.subset(range(i, min(i + batch_size, len(self))))


@dataclass
class Dataset:
    calib: TokenBlocks
    eval: TokenBlocks
    source: str
    info: dict = field(default_factory=dict)


MAX_TEXT_BYTES = 256 << 20  # far beyond what a statistics pass reads; the cap keeps a 20 GB log from being slurped


def read_text_file(path: Path, max_bytes: int | None = None) -> str:
    """A file's text, its first ``max_bytes`` when given (UTF-8, else Latin-1 / cp1252 when that is what it is), or
    DataError when it is not a regular readable file of mostly printable text (a device, a pipe, a binary renamed
    .txt)."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    if not stat.S_ISREG(mode):
        raise DataError(f"{path} is not a regular file (a device, a pipe or a socket); give a .txt file or a folder")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(min(MAX_TEXT_BYTES, max_bytes or MAX_TEXT_BYTES))
    except PermissionError as err:
        raise DataError(f"no permission to read {path}") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    if not raw:
        raise DataError(f"{path} is empty")
    if max_bytes and len(raw) == max_bytes:  # cut short: never end on half a UTF-8 character
        i = len(raw)
        while i > len(raw) - 4 and i > 0 and raw[i - 1] & 0xC0 == 0x80:
            i -= 1
        raw = raw[:i - 1] if i > 0 and raw[i - 1] >= 0xC0 else raw[:i]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        if text.count("\ufffd") > 0.001 * len(text) and b"\x00" not in raw[:200_000]:
            text = raw.decode("cp1252", errors="replace")  # Latin-1 family text is text too
    sample = text[:200_000]
    if not sample:
        return text
    bad = sum(1 for ch in sample if ch == "\ufffd" or (not ch.isprintable() and ch not in "\n\r\t\f\v"))
    if b"\x00" in raw[:200_000] or bad > 0.02 * len(sample):
        raise DataError(f"{path} does not look like text: {bad / len(sample):.0%} of its characters are binary or "
                        "control characters (is it a renamed binary file?). Give plain UTF-8 text.")
    return text


def check_block_len(block_len: int, config) -> None:
    """Refuse blocks longer than the model's positions: its perplexity there means nothing, and a huge block
    length only costs memory."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(cfg, "max_position_embeddings", None)
    if isinstance(n, int) and block_len > n:
        raise DataError(f"block length {block_len} exceeds the model's maximum positions ({n}); perplexity beyond "
                        f"them is not meaningful: use a block length of at most {n}")


def check_vocab(blocks: "TokenBlocks", model) -> None:
    """Refuse token ids the model has no embedding for: the tokenizer does not belong to this model."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        return
    top = int(blocks.input_ids.max()) if blocks.input_ids.numel() else -1
    if top >= n:
        raise DataError(f"the tokenizer gives token id {top}, but the model has only {n} token embeddings: this "
                        "tokenizer does not fit the model (save the model's own tokenizer beside it)")


def _read_files(files: list[Path], max_bytes: int | None) -> list[str]:
    """Texts of ``files`` in order until the domain's byte budget is spent (all of them without one)."""
    texts, left = [], max_bytes
    for f in files:
        if left is not None and left <= 0:
            break
        t = read_text_file(f, left)
        texts.append(t)
        if left is not None:
            left -= len(t.encode("utf-8", errors="replace"))
    return texts


def _read_domains(source: str, max_bytes: int | None = None) -> dict[str, list[str]]:
    path = Path(source).expanduser()
    try:
        exists = path.exists()
    except OSError as err:  # e.g. a path under a file (NotADirectoryError)
        raise DataError(f"data path cannot be read: {source} ({err.strerror or err})") from err
    if not exists:
        raise DataError(f"data path not found: {source}")
    if not path.is_dir() and not path.is_file():
        raise DataError(f"{source} is not a regular file (a device, a pipe or a socket); give a .txt file or a folder")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"no permission to read the folder {source}")
    if path.is_file():
        if path.suffix not in (".txt", ".md", ".rst", ".py", ""):
            raise DataError(f"{source}: expected a plain-text file (.txt)")
        return {path.stem: [read_text_file(path, max_bytes)]}
    out: dict[str, list[str]] = {}
    for f in sorted(path.glob("*.txt")):
        out[f.stem] = [read_text_file(f, max_bytes)]
    for d in sorted(p for p in path.iterdir() if p.is_dir()):
        texts = _read_files(sorted(d.glob("*.txt")), max_bytes)
        if texts:
            out[d.name] = texts
    if not out:
        raise DataError(f"{source}: no .txt files found (a domain is a .txt file or a folder of them)")
    return out


def _hf_texts(spec: str, max_chars: int = 2_000_000) -> dict[str, list[str]]:
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise DataError("Hugging Face datasets need `pip install datasets`") from err
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # network errors come in many classes
        raise DataError(f"cannot load dataset {name!r} from the hub (offline?): {str(err).splitlines()[0]}") from err
    texts, n = [], 0
    for row in ds:
        t = row.get("text") or next((v for v in row.values() if isinstance(v, str)), "")
        texts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    return {name.split("/")[-1]: texts}


def blocks_from_texts(tokenizer, domains: dict[str, list[str]], block_len: int,
                      keep_partial: bool = True) -> TokenBlocks:
    """Tokenise each domain's texts (documents joined by EOS) and cut into blocks of ``block_len``."""
    if block_len < 2:
        raise DataError("block length must be at least 2 tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sep = tokenizer.eos_token or ""
    rows, lens, doms, nbytes = [], [], [], []
    names = list(domains)
    for di, name in enumerate(names):
        ids = tokenizer(sep.join(t for t in domains[name] if t.strip()), verbose=False)["input_ids"]
        for s in range(0, len(ids), block_len):
            chunk = ids[s:s + block_len]
            if len(chunk) < 2 or (len(chunk) < block_len and not keep_partial and s > 0):
                continue
            rows.append(chunk + [pad] * (block_len - len(chunk)))
            lens.append(len(chunk))
            doms.append(di)
            nbytes.append(len(tokenizer.decode(chunk[1:]).encode("utf-8")))
    if not rows:
        raise DataError(f"text too short to evaluate: need at least 2 tokens, got {sum(len(t) for v in domains.values() for t in v)} characters")
    return TokenBlocks(torch.tensor(rows, dtype=torch.long), torch.tensor(lens), torch.tensor(doms), names,
                       torch.tensor(nbytes, dtype=torch.float64), block_len, pad)


def text_blocks(tokenizer, text: str, block_len: int = 256, domain: str = "text") -> TokenBlocks:
    """A user's text as blocks (one domain), for a quick evaluation or a routing strip."""
    return blocks_from_texts(tokenizer, {domain: [text]}, block_len)


# no tokenizer spends more bytes per token than this on text: a token cap becomes a byte budget while reading
BYTES_PER_TOKEN_BOUND = 16


def load_data(tokenizer, source: str = "demo", block_len: int = 256, max_tokens: int | None = None,
              eval_fraction: float = 0.5, seed: int = 0, model=None) -> Dataset:
    """Calibration and evaluation blocks from ``source``; ``max_tokens`` caps each split per domain (and what is
    read and tokenised: a 200 MB file with a cap of 2048 tokens is read for its first few hundred kilobytes).
    With ``model``, a block length past its positions and token ids past its vocabulary are refused."""
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"the token cap must be a positive number of tokens, got {max_tokens}")
    if model is not None:
        check_block_len(block_len, model.config)
    ds = _load_data(tokenizer, source, block_len, max_tokens, eval_fraction, seed)
    if model is not None:
        check_vocab(ds.calib, model)
        check_vocab(ds.eval, model)
    return ds


def _load_data(tokenizer, source, block_len, max_tokens, eval_fraction, seed) -> Dataset:
    if source == "demo":
        if not CORPUS.is_dir():
            raise DataError(f"the bundled demo corpus is missing at {CORPUS}")
        doms = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
        # with a token cap, tokenise only a generous prefix (no tokenizer spends 16 characters per token)
        cut = None if not max_tokens else (max_tokens + block_len) * BYTES_PER_TOKEN_BOUND

        def read(d, split):
            return [(CORPUS / d / f"{split}.txt").read_text("utf-8")[:cut]]

        calib = blocks_from_texts(tokenizer, {d: read(d, "calib") for d in doms}, block_len, keep_partial=False)
        ev = blocks_from_texts(tokenizer, {d: read(d, "eval") for d in doms}, block_len, keep_partial=False)
        return Dataset(calib.limit(max_tokens), ev.limit(max_tokens), "demo", {"domains": doms})
    if not 0.0 < eval_fraction < 1.0:
        raise DataError("eval_fraction must be between 0 and 1")
    # both splits come from what is read: twice the cap per domain, plus a block each
    budget = None if not max_tokens else 2 * (max_tokens + block_len) * BYTES_PER_TOKEN_BOUND
    domains = _hf_texts(source) if source.startswith("hf:") else _read_domains(source, budget)
    allb = blocks_from_texts(tokenizer, domains, block_len)
    rng = random.Random(seed)
    calib_idx, eval_idx = [], []
    for d in range(len(allb.domains)):
        rows = (allb.domain == d).nonzero().flatten().tolist()
        if len(rows) < 2:
            raise DataError(f"domain {allb.domains[d]!r} is too short: it gives {len(rows)} block of {block_len} "
                            "tokens; calibration and evaluation need one block each (add text or lower block_len)")
        rng.shuffle(rows)
        n_eval = max(1, min(len(rows) - 1, round(len(rows) * eval_fraction)))
        eval_idx += rows[:n_eval]
        calib_idx += rows[n_eval:]
    return Dataset(allb.subset(sorted(calib_idx)).limit(max_tokens), allb.subset(sorted(eval_idx)).limit(max_tokens),
                   source, {"domains": allb.domains})
