"""A small multiple-choice task built from a corpus's held-out text: "which of N lines is the true next line".

From the held-out documents only (calibration/data.py's split: the 10% of documents that calibration never
sees), deterministic from a seed:

  context   the `context_lines` non-empty lines before a line (joined with newlines)
  choices   that line and `choices - 1` distractor lines drawn from other held-out documents of the same
            corpus (another play, another page: the model must know what follows, not just the register)
  label     the true line's position among the shuffled choices

Lines are "usable" when they hold 20-160 characters and at least 3 letters (no RST underlines, no bare speaker
tags). The scorer is eval/mc.py with delimiter "\\n" (the true line continues the context after a newline); the
same items are written for lm-evaluation-harness by `write_lm_eval_task` (a task YAML + a jsonl beside it), and

    python -m compressor.eval.corpus_tasks --source asset:shakespeare --num-items 200 --out DIR

writes them for `lm_eval --include_path DIR --tasks corpus-next-line`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DELIMITER = "\n"
MIN_CHARS, MAX_CHARS = 20, 160


def usable(line: str) -> bool:
    s = line.strip()
    return MIN_CHARS <= len(s) <= MAX_CHARS and sum(ch.isalpha() for ch in s) >= 3 and s[0] not in "=-*#.:"


def build_items(texts: list[str], num_items: int, choices: int = 4, context_lines: int = 3,
                seed: int = 0) -> list[dict]:
    """Items {"id", "context", "choices", "label"} from held-out `texts` (one per document). Deterministic."""
    from compressor.errors import InputError

    docs = [[ln.strip() for ln in t.splitlines() if ln.strip()] for t in texts]
    # Candidate positions: a usable line with `context_lines` non-empty lines before it.
    cands = [(d, i) for d, lines in enumerate(docs) for i in range(context_lines, len(lines)) if usable(lines[i])]
    pool = [(d, ln) for d, lines in enumerate(docs) for ln in lines if usable(ln)]
    if len(cands) < num_items:
        raise InputError(f"the held-out text has {len(cands)} usable lines, need {num_items} items; lower num_items")
    rng = random.Random(seed)
    picked = rng.sample(cands, num_items)
    multi_doc = len(docs) > 1
    items = []
    for n, (d, i) in enumerate(picked):
        true = docs[d][i]
        distract: list[str] = []
        while len(distract) < choices - 1:
            od, ln = pool[rng.randrange(len(pool))]
            if (multi_doc and od == d) or ln == true or ln in distract:
                continue
            distract.append(ln)
        opts = [true] + distract
        rng.shuffle(opts)
        items.append({"id": n, "context": "\n".join(docs[d][i - context_lines:i]), "choices": opts,
                      "label": opts.index(true)})
    return items


def held_out_items(source: str, num_items: int, choices: int = 4, context_lines: int = 3, seed: int = 0,
                   text_field: str = "text", split: str = "train") -> list[dict]:
    """Items from the held-out documents of a data source (asset:NAME, a local file or folder)."""
    from compressor.calibration.data import load_documents, split_documents

    _, held = split_documents(load_documents(source, text_field, split))
    return build_items(held, num_items, choices, context_lines, seed)


def write_lm_eval_task(items: list[dict], folder: Path, task: str = "corpus-next-line") -> Path:
    """Write `task`.yaml and `task`.jsonl into `folder` (an lm-eval include_path); -> the YAML's path.
    The YAML reads the jsonl beside it through the `json` dataset builder: local, offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    data.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    yaml_path = folder / f"{task}.yaml"
    yaml_path.write_text(
        f"# Built by compressor.eval.corpus_tasks from held-out text: which line follows the context.\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        f"target_delimiter: {json.dumps(DELIMITER)}\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n", encoding="utf-8")
    return yaml_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="asset:shakespeare")
    ap.add_argument("--num-items", type=int, default=200)
    ap.add_argument("--choices", type=int, default=4)
    ap.add_argument("--context-lines", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--task", default="corpus-next-line")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    items = held_out_items(a.source, a.num_items, a.choices, a.context_lines, a.seed)
    print(write_lm_eval_task(items, Path(a.out), a.task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
