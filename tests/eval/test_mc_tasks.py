"""Multiple-choice scoring (eval/mc.py), the corpus next-line task (eval/corpus_tasks.py) and lm-eval on the same
items (eval/lm_eval_adapter.py): tiny random Llama, real tokenizer, real lm-eval."""

from __future__ import annotations

import pytest
import torch

from compressor.eval import corpus_tasks, mc
from tests.conftest import make_text


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _docs(n_docs: int = 6) -> list[str]:
    """Documents of short lines (sentences of make_text, one per line)."""
    out = []
    for d in range(n_docs):
        sents = make_text(400, 100 + d).split(". ")
        out.append("\n".join(s.strip() + "." for s in sents if s.strip()))
    return out


def test_forced_answers_give_exact_accuracy(tiny):
    """Single-token choices at the id level: the model's own argmax token is the right answer in every item
    (accuracy exactly 1), its least likely token in every item (exactly 0)."""
    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    hits = {"best": 0, "worst": 0}
    for _ in range(12):
        ctx = torch.randint(3, 300, (10,), generator=g).tolist()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx])).logits[0, -1]
        best, worst = int(logits.argmax()), int(logits.argmin())
        others = [t for t in torch.randperm(300, generator=g).tolist() if t not in (best, worst)][:3]
        for name, tok in (("best", best), ("worst", worst)):
            scored = mc.continuation_logprobs(model, ctx, [[t] for t in [tok, *others]])
            ll = [s[0] for s in scored]
            hits[name] += int(max(range(4), key=lambda i: ll[i]) == 0)
            assert scored[0][1] == (name == "best")  # greedy flag
            # The summed log-probability is the model's own log-softmax at the last position.
            assert ll[0] == pytest.approx(float(torch.log_softmax(logits, -1)[tok]), abs=1e-5)
    assert hits == {"best": 12, "worst": 0}


def test_build_items_is_deterministic_and_held_out_shaped():
    docs = _docs()
    a = corpus_tasks.build_items(docs, 40, choices=4, context_lines=3, seed=7)
    b = corpus_tasks.build_items(docs, 40, choices=4, context_lines=3, seed=7)
    c = corpus_tasks.build_items(docs, 40, choices=4, context_lines=3, seed=8)
    assert a == b and a != c and len(a) == 40
    lines_of = [set(d.splitlines()) for d in docs]
    for it in a:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert len(it["context"].splitlines()) == 3
        true = it["choices"][it["label"]]
        home = [i for i, s in enumerate(lines_of) if it["context"].splitlines()[-1] in s and true in s]
        assert home  # the true line lives in the context's document ...
        for j, ch in enumerate(it["choices"]):  # ... and every distractor comes from another document
            if j != it["label"]:
                assert not any(ch in lines_of[h] for h in home)
    labels = [it["label"] for it in a]
    assert len(set(labels)) == 4  # the true line is shuffled among the positions
    with pytest.raises(Exception, match="usable lines"):
        corpus_tasks.build_items(docs[:1], 10_000)


def test_score_items_and_intervals(tiny):
    model, tok = tiny
    items = corpus_tasks.build_items(_docs(), 24, seed=1)
    r = mc.score_items(model, tok, items, delimiter=corpus_tasks.DELIMITER)
    assert r["items"] == 24 and len(r["correct"]) == 24
    assert r["accuracy"] == sum(r["correct"]) / 24 and r["accuracy_norm"] == sum(r["correct_norm"]) / 24
    for it, lls, c in zip(items, r["loglikelihoods"], r["correct"]):
        assert len(lls) == 4 and all(v < 0 for v in lls)
        assert c == int(max(range(4), key=lambda i: lls[i]) == it["label"])
    iv = mc.accuracy_intervals(r["correct"], r["correct"], level=0.9, resamples=500, seed=3)
    assert iv["accuracy"]["low"] <= r["accuracy"] <= iv["accuracy"]["high"]
    assert iv["accuracy_delta"] == {"value": 0.0, "low": 0.0, "high": 0.0}  # paired: identical runs never differ
    forced = mc.accuracy_intervals([1] * 10 + [0] * 10, resamples=2000, seed=0)
    assert forced["accuracy"]["value"] == 0.5 and 0.25 <= forced["accuracy"]["low"] < 0.5 < forced["accuracy"]["high"] <= 0.75


def test_lm_eval_scores_equal_ours(tiny, tmp_path):
    """Our built task written as an lm-eval task (YAML + jsonl, local, offline): lm-eval's per-item acc and
    acc_norm through our LM adapter are exactly our scorer's."""
    pytest.importorskip("lm_eval")
    from compressor.eval import lm_eval_adapter

    model, tok = tiny
    items = corpus_tasks.build_items(_docs(), 30, seed=2)
    corpus_tasks.write_lm_eval_task(items, tmp_path / "tasks", "tiny-next-line")
    ours = mc.score_items(model, tok, items, delimiter=corpus_tasks.DELIMITER)
    theirs = lm_eval_adapter.run_tasks(model, tok, ["tiny-next-line"], [str(tmp_path / "tasks")])["tiny-next-line"]
    assert theirs["items"] == 30
    assert theirs["correct"] == ours["correct"] and theirs["correct_norm"] == ours["correct_norm"]
    assert theirs["accuracy"] == ours["accuracy"] and theirs["accuracy_norm"] == ours["accuracy_norm"]
    limited = lm_eval_adapter.run_tasks(model, tok, ["tiny-next-line"], [str(tmp_path / "tasks")], limit=10)
    assert limited["tiny-next-line"]["correct"] == ours["correct"][:10]
    with pytest.raises(Exception, match="unknown task"):
        lm_eval_adapter.run_tasks(model, tok, ["no-such-task"], [str(tmp_path / "tasks")])


def test_lm_eval_rolling_and_generation(tiny):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from compressor.eval import lm_eval_adapter
    from compressor.eval.metrics import window_logprobs

    model, tok = tiny
    lm = lm_eval_adapter.make_lm(model, tok, max_len=16)
    text = make_text(30, 5)
    ids = [tok.eos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    # With a window longer than the text, the rolling log-likelihood is one forward pass.
    full = float(window_logprobs(model, torch.tensor(ids)).gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert lm_eval_adapter.rolling_loglikelihood(model, tok, text, 1024) == pytest.approx(full, rel=1e-5)
    chunked = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert len(ids) > 16 and chunked < 0 and chunked != pytest.approx(full, rel=1e-9)
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.generate_until([])


def test_corpus_task_command_writes_an_lm_eval_task(tmp_path):
    import json

    src = tmp_path / "docs"
    src.mkdir()
    for i, d in enumerate(_docs(12)):
        (src / f"d{i:02d}.txt").write_text(d)
    assert corpus_tasks.main(["--source", str(src), "--num-items", "5", "--seed", "3", "--task", "t5",
                              "--out", str(tmp_path / "out")]) == 0
    items = [json.loads(ln) for ln in (tmp_path / "out" / "t5.jsonl").read_text().splitlines()]
    assert len(items) == 5 and items == corpus_tasks.held_out_items(str(src), 5, seed=3)
    y = (tmp_path / "out" / "t5.yaml").read_text()
    assert "task: t5" in y and "output_type: multiple_choice" in y and 'target_delimiter: "\\n"' in y


def test_empty_context_is_conditioned_on_eos(tiny):
    model, tok = tiny
    (ll, _), = mc.score_requests(model, tok, [("", "the king")])
    ids = tok("the king", add_special_tokens=False)["input_ids"]
    (ref, _), = mc.continuation_logprobs(model, [tok.eos_token_id], [ids])
    assert ll == ref < 0
