"""MQAR (tools/mqar_data.py, tools/mqar.py): the generator's layout, the scorers on hand-made cases, and a
tiny train → evaluate-through-LLM run on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fenwick_llm.tools import mqar_data as mq
from fenwick_llm.tools.mqar import main as mqar_main
from fenwick_llm.tools.mqar import table
from tokenizers import Tokenizer as HFTokenizer

VOCAB = mq.MQARVocab(31)  # keys 1..10, values 11..20, noise 21..30


def test_vocab_ranges_are_disjoint() -> None:
    assert (VOCAB.n_keys, VOCAB.key_start, VOCAB.value_start, VOCAB.noise_start) == (10, 1, 11, 21)
    assert [VOCAB.token(i) for i in (0, 1, 10, 11, 21, 30)] == ["<eos>", "k0", "k9", "v0", "n0", "n9"]
    with pytest.raises(ValueError):
        mq.MQARVocab(6)


@pytest.mark.parametrize("seq_len,n,q", [(24, 3, None), (64, 5, 2), (14, 3, None)],
                         ids=["T24", "T64-q2", "tight"])
def test_generator_layout(seq_len: int, n: int, q: int | None) -> None:
    b = mq.generate(16, seq_len, n, VOCAB, seed=3, num_queries=q)
    Q = n if q is None else q
    assert b.inputs.shape == b.labels.shape == (16, seq_len) and b.query_pos.shape == (16, Q)
    for x, y, pos in zip(b.inputs.tolist(), b.labels.tolist(), b.query_pos.tolist(), strict=True):
        keys, values = x[0:2 * n:2], x[1:2 * n:2]
        assert len(set(keys)) == n and all(1 <= k <= 10 for k in keys)
        assert all(11 <= v <= 20 for v in values)
        kv = dict(zip(keys, values, strict=True))
        assert pos == sorted(pos) and all(p >= 2 * n and (p - 2 * n) % 2 == 0 for p in pos)
        assert len({x[p] for p in pos}) == Q  # each queried key once
        for p in pos:
            assert x[p] in kv and x[p + 1] == kv[x[p]] == y[p]  # the target follows its key
        others = [i for i in range(2 * n, seq_len) if i not in pos and i - 1 not in pos]
        assert all(x[i] >= 21 for i in others)  # the rest of the query region is noise
        assert [i for i, t in enumerate(y) if t != mq.IGNORE] == pos


def test_generator_is_seeded_and_checks_sizes() -> None:
    a, b = mq.generate(4, 32, 4, VOCAB, seed=7), mq.generate(4, 32, 4, VOCAB, seed=7)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, mq.generate(4, 32, 4, VOCAB, seed=8).inputs)
    with pytest.raises(ValueError, match="too short"):
        mq.generate(2, 12, 4, VOCAB, seed=0)  # 8 context tokens + 4 queries need 16
    with pytest.raises(ValueError, match="distinct keys"):
        mq.generate(2, 64, 11, VOCAB, seed=0)


def _hand_batch() -> mq.MQARBatch:
    #        k1 v11 k2 v12 | n21 k2 v12 n22 k1 v11
    x = torch.tensor([[1, 11, 2, 12, 21, 2, 12, 22, 1, 11]])
    y = torch.full_like(x, mq.IGNORE)
    y[0, 5], y[0, 8] = 12, 11
    return mq.MQARBatch(x, y, torch.tensor([[5, 8]]))


def test_score_counts_only_query_positions() -> None:
    b = _hand_batch()
    pred = torch.full_like(b.inputs, 30)  # wrong everywhere else: must not matter
    pred[0, 5], pred[0, 8] = 12, 11
    assert mq.score(pred, b) == 1.0
    pred[0, 8] = 12
    assert mq.score(pred, b) == 0.5


def test_eval_prompts_end_at_a_query_key() -> None:
    b = _hand_batch()
    prompts, answers = mq.eval_prompts(b, seed=0)
    assert prompts[0] in ([1, 11, 2, 12, 21, 2], [1, 11, 2, 12, 21, 2, 12, 22, 1])
    assert answers[0] == {6: 12, 9: 11}[len(prompts[0])]
    big = mq.generate(32, 40, 4, VOCAB, seed=1)
    prompts, answers = mq.eval_prompts(big, seed=1)
    for p, a, x in zip(prompts, answers, big.inputs.tolist(), strict=True):
        assert p == x[:len(p)] and x[len(p)] == a and 1 <= p[-1] <= 10


def test_accuracy_on_hand_cases() -> None:
    assert mq.accuracy([[12], [11]], [12, 11]) == 1.0
    assert mq.accuracy([[12, 5], [3]], [12, 11]) == 0.5  # only the first generated token counts
    assert mq.accuracy([[], [11]], [12, 11]) == 0.5  # nothing generated is wrong
    with pytest.raises(ValueError):
        mq.accuracy([[1]], [1, 2])


def test_tokenizer_covers_the_vocabulary(tmp_path: Path) -> None:
    mq.save_tokenizer(VOCAB, tmp_path, 128)
    tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 31
    assert tok.encode("k0 v0 n9 <eos>").ids == [1, 11, 30, 0]
    assert tok.decode([1, 11, 30]) == "k0 v0 n9"


def test_table_formats_engine_and_forward_accuracy() -> None:
    res = {"lambda_mode": "mlp", "rows": [{"seq_len": 256, "engine_acc": 0.5, "forward_acc": 0.5},
                                          {"seq_len": 512, "skipped": "budget"}]}
    assert table([res]).splitlines() == ["| lambda_mode | 256 | 512 |", "| --- | --- | --- |",
                                         "| mlp | 50.0 (50.0) | — |"]


def test_tiny_train_then_recall_through_llm(tmp_path: Path) -> None:
    model = tmp_path / "mlp"
    report = mqar_main(["train", "--out", str(model), "--vocab-size", "31", "--train-mix", "16:1,32:2",
                        "--batch-tokens", "256", "--hidden", "32", "--layers", "1",
                        "--head-dim", "16", "--state-size", "8", "--lambda-levels", "8", "--steps", "12",
                        "--warmup", "2", "--eval-every", "6", "--device", "cpu"])
    task = json.loads((model / "mqar.json").read_text())
    assert report["steps_run"] == 12 and task["num_kv_pairs"] == 2 and task["train_mix"] == [[16, 1], [32, 2]]
    out = tmp_path / "eval.json"
    result = mqar_main(["eval", "--model", str(model), "--out", str(out), "--lens", "16,32,256",
                        "--examples", "8", "--device", "cpu", "--check-forward-max-len", "32"])
    assert json.loads(out.read_text()) == result
    rows = {r["seq_len"]: r for r in result["rows"]}
    assert "max_model_len" in rows[256]["skipped"]  # 8 levels hold 128 positions
    for T in (16, 32):
        assert 0.0 <= rows[T]["engine_acc"] <= 1.0
        # the serving path and the full-sequence forward answer the same prompts alike (one tie allowed)
        assert abs(rows[T]["engine_acc"] - rows[T]["forward_acc"]) <= 1 / 8
