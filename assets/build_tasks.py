"""Build the demo's offline lm-evaluation-harness tasks from the held-out (eval) split of the demo corpus.

Never from the calibration split: statistics and plans are made on calib, so tasks on it would reward overfitting.

  demo_next_line_<domain>  multiple choice, one per domain: a passage (about 300 characters ending at a line
                           break), and four candidate next lines: the real one and three other lines of the same
                           domain's held-out text, of similar length. Metric: acc / acc_norm (chance 0.25).
  demo_next_word           generative (``generate_until``): a passage of code or verse cut before a word; the model's
                           greedy continuation is scored on its first word (exact match, chance ~0).

Each task is an lm-eval YAML beside its jsonl; ``data_files`` is relative to the YAML, which
``explorer.tasks`` resolves. Deterministic (seeded): running it again gives the same files.

Run:  python assets/build_tasks.py
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
OUT = ROOT / "tasks"
SEED = 4321
DOMAINS = ("code", "docs", "shakespeare", "bible")
MC_ITEMS = 700  # per domain: the standard error of an accuracy near 0.5 is then under 2 points (n > 625)
CONTEXT_CHARS = 300
WORD_ITEMS = 300  # per domain of the generative task (code and shakespeare)


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _span(lines: list[str], i: int) -> str:
    """The candidate answer at line ``i``: the line itself (two-line answers measured no easier for the demo)."""
    return lines[i]


def _candidates(lines: list[str]) -> list[int]:
    """Line indices that make a fair question: two real lines of some length, with enough text before them."""
    out, chars = [], 0
    for i, line in enumerate(lines[:-1]):
        nxt = lines[i + 1]
        if (chars >= CONTEXT_CHARS and 16 <= len(line.strip()) <= 140 and 8 <= len(nxt.strip()) <= 140
                and not line.strip().startswith("#")):
            out.append(i)
        chars += len(line) + 1
    return out


def _context(lines: list[str], i: int) -> str:
    ctx, n = [], 0
    j = i - 1
    while j >= 0 and n < CONTEXT_CHARS:
        ctx.insert(0, lines[j])
        n += len(lines[j]) + 1
        j -= 1
    return "\n".join(ctx)[-CONTEXT_CHARS:] + "\n"


def multiple_choice(domain: str, rng: random.Random) -> list[dict]:
    lines = _lines((CORPUS / domain / "eval.txt").read_text("utf-8"))
    cand = _candidates(lines)
    by_len = sorted(cand, key=lambda i: len(_span(lines, i)))
    rng.shuffle(cand)
    items, used = [], set()
    for i in cand:
        if len(items) == MC_ITEMS:
            break
        if any(abs(i - u) < 3 for u in used):  # contexts overlap little
            continue
        real = _span(lines, i)
        pos = by_len.index(i)
        near = [j for j in by_len[max(0, pos - 60): pos + 60] if abs(j - i) > 2 and lines[j].strip() != lines[i].strip()
                and abs(len(_span(lines, j)) - len(real)) <= 0.3 * len(real)]
        if len(near) < 3:
            continue
        distract = [_span(lines, j) for j in rng.sample(near, 3)]
        label = rng.randrange(4)
        choices = distract[:label] + [real] + distract[label:]
        items.append({"context": _context(lines, i), "choices": choices, "label": label})
        used.add(i)
    return items


def next_word(domain: str, rng: random.Random) -> list[dict]:
    text = (CORPUS / domain / "eval.txt").read_text("utf-8")
    spots = [m.start() for m in re.finditer(r"(?<=[ \t])[A-Za-z_][A-Za-z0-9_]{2,}", text) if m.start() > CONTEXT_CHARS]
    rng.shuffle(spots)
    items, used = [], []
    for s in spots:
        if len(items) == WORD_ITEMS:
            break
        if any(abs(s - u) < 200 for u in used):
            continue
        word = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[s:])[0]
        ctx = text[s - CONTEXT_CHARS: s].rstrip(" \t")  # the space before the word is the model's to write
        if "\n" not in ctx[-120:] and len(ctx) < 40:
            continue
        items.append({"context": ctx, "target": word, "domain": domain})
        used.append(s)
    return items


MC_YAML = """task: demo_next_line_{domain}
dataset_path: json
dataset_kwargs:
  data_files:
    test: demo_next_line_{domain}.jsonl
test_split: test
# lm-eval's CLI from any folder (lm_eval --include_path assets/tasks): data files found beside demo_data.py
custom_dataset: !function demo_data.load
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "Which of four lines comes next in held-out {domain} text (the demo corpus's eval split)? Chance 0.25."
"""

WORD_YAML = r"""task: demo_next_word
dataset_path: json
dataset_kwargs:
  data_files:
    test: demo_next_word.jsonl
test_split: test
# lm-eval's CLI from any folder (lm_eval --include_path assets/tasks): data files found beside demo_data.py
custom_dataset: !function demo_data.load
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: ""
generation_kwargs:
  until: ["\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "^\\s*([A-Za-z_][A-Za-z0-9_]*)"
        fallback: ""
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  description: "The next word of held-out code or verse (the demo corpus's eval split), greedy; chance ~0."
"""


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = random.Random(SEED)
    for d in DOMAINS:
        items = multiple_choice(d, rng)
        (OUT / f"demo_next_line_{d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        (OUT / f"demo_next_line_{d}.yaml").write_text(MC_YAML.format(domain=d))
        print(f"demo_next_line_{d}: {len(items)} items")
    words = [x for d in ("code", "shakespeare") for x in next_word(d, rng)]
    (OUT / "demo_next_word.jsonl").write_text("".join(json.dumps(x) + "\n" for x in words))
    (OUT / "demo_next_word.yaml").write_text(WORD_YAML)
    print(f"demo_next_word: {len(words)} items")


if __name__ == "__main__":
    main()
