"""eval.alpaca_eval.reference = "iteration0": the win rate against the starting model's
own answers (a head-to-head), 50 at iteration 0 by construction."""

from __future__ import annotations

import json

import pytest

from harness.config.eval_sections import AlpacaEvalSection
from harness.evaluate.alpaca import run_alpaca_eval
from harness.judges.base import Verdict
from harness.models.load import load_model, load_tokenizer


class LongerWins:
    name, scale = "longer_wins", (0.0, 1e9)

    def score(self, items):
        return [Verdict(score=float(len(i.response))) for i in items]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir), device="cpu"), load_tokenizer(str(tiny_dir))


def test_iteration0_reference(tiny, tmp_path):
    model, tok = tiny
    ins = tmp_path / "ae.json"
    ins.write_text(json.dumps([{"instruction": f"say something {i}", "output": "x" * 500} for i in range(8)]))
    section = AlpacaEvalSection(instructions=str(ins), reference="iteration0")
    kw = dict(seed_key=(0, 0), max_new_tokens=8, batch_size=4)
    m0 = run_alpaca_eval(model, tok, section, LongerWins, tmp_path / "it0", generator="r/iter_000", **kw)
    assert m0["alpaca_eval/win_rate"] == pytest.approx(50.0)   # every answer ties with itself
    assert m0["alpaca_eval/n_draws"] == 8
    # a later iteration is judged against the iteration-0 answers, not the file's 500-char outputs
    own = {json.loads(x)["id"]: json.loads(x)["samples"][0]["text"]
           for x in (tmp_path / "it0" / "generations.jsonl").read_text().splitlines()}
    shorter = {k: v[: len(v) // 2] for k, v in own.items()}   # a reference the model beats on length
    m1 = run_alpaca_eval(model, tok, section, LongerWins, tmp_path / "it1", generator="r/iter_001",
                         reference=shorter, reference_name="r/iter_000", **kw)
    ann = json.loads((tmp_path / "it1" / "annotations.json").read_text())
    assert {a["generator_1"] for a in ann} == {"r/iter_000"}
    assert [a["output_1"] for a in ann] == [shorter[a["id"]] for a in ann]
    credit = [1.0 if len(a["output_2"]) > len(a["output_1"]) else 0.5 if a["output_2"] == a["output_1"] else 0.0
              for a in ann]
    assert m1["alpaca_eval/win_rate"] == pytest.approx(100 * sum(credit) / len(credit))
    assert m1["alpaca_eval/win_rate"] > 50
