"""The adaptive-decay study (tools/decay_*.py, tools/copy_data.py): selective-copying data, the model
variants, statistics, and one tiny end-to-end run of the driver on the CPU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from fenwick_llm.tools import copy_data as cp
from fenwick_llm.tools import decay_tasks as tasks
from fenwick_llm.tools.decay_job import Job, TrainPlan, level_scale_profile, run_job
from fenwick_llm.tools.decay_models import VARIANTS, Shape, SoftmaxLambda, build
from fenwick_llm.tools.decay_stats import compare, interval, overlap
from fenwick_llm.tools.decay_study import main as study_main
from test_train import play_text

TINY = Shape(hidden=32, layers=2, head_dim=16, state_size=8, lambda_levels=9)


# ---- selective copying -----------------------------------------------------------------------------
@pytest.mark.parametrize("T,M", [(9, 4), (64, 4), (100, 16)], ids=lambda x: str(x))
def test_copy_layout(T: int, M: int) -> None:
    vocab = cp.CopyVocab(12)
    b = cp.generate(5, T, M, vocab, seed=T)
    ctx = T - 1 - M
    assert b.inputs.shape == (5, T) and b.answers.shape == (5, M) and b.prompt_len == ctx + 1
    for i in range(5):
        x = b.inputs[i]
        data = (x[:ctx] != cp.NOISE).nonzero().flatten()
        assert torch.equal(data, b.data_pos[i]) and torch.equal(x[data], b.answers[i])  # in order
        assert x[ctx] == cp.SEP and torch.equal(x[ctx + 1:], b.answers[i])
        assert ((b.answers[i] >= vocab.data_start) & (b.answers[i] < vocab.vocab_size)).all()
        labelled = (b.labels[i] != cp.IGNORE).nonzero().flatten()
        assert labelled.tolist() == list(range(ctx, T - 1))
        assert torch.equal(b.labels[i, ctx:T - 1], x[ctx + 1:])  # the label is the next input token


def test_copy_is_seeded_and_checks_sizes() -> None:
    vocab = cp.CopyVocab(8)
    a, b = cp.generate(3, 40, 4, vocab, seed=1), cp.generate(3, 40, 4, vocab, seed=1)
    assert torch.equal(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, cp.generate(3, 40, 4, vocab, seed=2).inputs)
    with pytest.raises(ValueError, match="too short"):
        cp.generate(1, 8, 4, vocab, seed=0)
    with pytest.raises(ValueError):
        cp.CopyVocab(3)


def test_copy_scores() -> None:
    b = cp.generate(4, 30, 3, cp.CopyVocab(10), seed=0)
    ans = b.answers.tolist()
    assert cp.score(ans, b.answers) == {"token_acc": 1.0, "exact": 1.0}
    wrong_last = [a[:2] + [0] for a in ans]
    assert cp.score(wrong_last, b.answers) == pytest.approx({"token_acc": 2 / 3, "exact": 0.0})
    assert cp.score([[]] * 4, b.answers) == {"token_acc": 0.0, "exact": 0.0}  # nothing generated
    perfect = torch.cat([b.inputs[:, 1:], b.inputs[:, :1]], 1)  # the next token everywhere
    assert cp.forward_score(perfect, b) == {"token_acc": 1.0, "exact": 1.0}


# ---- model variants --------------------------------------------------------------------------------
def test_variants_share_the_backbone_and_start_at_lambda_one() -> None:
    models = {v: build(VARIANTS[v], TINY, 40, torch.device("cpu"), seed=3) for v in VARIANTS}
    base = models["none"].state_dict()
    x = torch.randint(0, 40, (2, 70), generator=torch.Generator().manual_seed(0))
    for name, m in models.items():
        sd = m.state_dict()
        assert all(torch.equal(base[k], sd[k]) for k in base), name
        profile = level_scale_profile(m.eval(), x, torch.device("cpu"))
        assert len(profile) == TINY.layers and len(profile[0]) == TINY.lambda_levels
        if name != "linear":  # linear's λ = softplus(L · dl) depends on the input from the start
            assert all(abs(v - 1.0) < 1e-5 for layer in profile for v in layer[:8]), name
        assert all(layer[8] is None for layer in profile)  # 70 positions reach levels 0..7 only


def test_softmax_lambda_shares_a_total_of_L() -> None:
    m = build(VARIANTS["mlp-softmax"], TINY, 40, torch.device("cpu"), seed=0)
    mods = [mod for mod in m.modules() if isinstance(mod, SoftmaxLambda)]
    assert len(mods) == TINY.layers
    with torch.no_grad():
        mods[0].fc2.weight.normal_()
        lam = mods[0](torch.randn(3, 5, 4, TINY.lambda_levels))
    assert lam.shape == (3, 5, 4, TINY.lambda_levels) and (lam > 0).all()
    torch.testing.assert_close(lam.sum(-1), torch.full((3, 5, 4), float(TINY.lambda_levels)))
    assert lam.std() > 0.01
    assert not VARIANTS["mlp-softmax"].servable and VARIANTS["mlp"].servable


# ---- statistics ------------------------------------------------------------------------------------
def test_t_interval_and_paired_comparison() -> None:
    s = interval([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert interval([5.0])["ci95"] is None
    a, b = {0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.5, 1: 0.45, 2: 0.52}
    assert compare(a, b, "max")["verdict"] == "first better"
    assert compare(a, b, "min")["verdict"] == "second better"  # e.g. a loss: lower is better
    assert compare(a, {0: 0.95, 1: 0.7, 2: 0.86}, "max")["verdict"] == "no significant difference"
    assert compare(a, {5: 1.0}, "max")["n"] == 0
    assert overlap(interval([1.0, 1.1]), interval([1.05, 1.2])) is True
    assert overlap(interval([1.0, 1.01, 1.02]), interval([2.0, 2.01, 2.02])) is False


def test_position_edges() -> None:
    assert tasks.position_edges(512) == [0, 64, 128, 256, 512]
    assert tasks.position_edges(32) == [0, 32]


def test_job_past_its_deadline_is_skipped(tmp_path: Path) -> None:
    spec = tasks.MQARSpec(31, ((16, 1),), (16,), 1, 8)
    job = Job(spec, "mlp", 0, TINY, TrainPlan(steps=2, batch_tokens=64, lr=1e-2), "cpu", str(tmp_path),
              deadline=time.time() + 5, expected_seconds=60)
    res = run_job(job)
    assert res["status"] == "skipped" and res["name"] == "mqar-mlp-s0" and res["wall_seconds"] == 0.0


# ---- the driver end to end -------------------------------------------------------------------------
def _numbers(obj) -> list[float]:
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    items = obj.values() if isinstance(obj, dict) else obj
    return [x for v in items for x in _numbers(v)]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("decay_smoke")
    text = root / "play.txt"
    text.write_text(play_text(400))
    out = root / "out"
    # a generous budget: steps are capped by the preset, the budget only guards a loaded CI machine
    study = study_main(["--out", str(out), "--text", str(text), "--preset", "smoke", "--device", "cpu",
                        "--work", str(root / "work"), "--budget", "300"])
    return out, study


def test_smoke_writes_the_result_files(smoke: tuple[Path, dict]) -> None:
    out, study = smoke
    per_task = (f"{t}.{e}" for t in ("mqar", "copy", "lm") for e in ("json", "png"))
    names = {"study.json", "summary.md", *per_task}
    assert {p.name for p in out.iterdir()} == names
    assert json.loads((out / "study.json").read_text())["status"] == study["status"]
    assert study["finished"] and study["status"]["ok"] == study["jobs_planned"] == 2 * (6 + 3 + 3)
    assert study["device"].startswith("cpu") and study["wall_seconds"] > 0
    assert all(math.isfinite(x) for x in _numbers(study)), "a NaN or inf in the results"
    assert "| mlp |" in (out / "summary.md").read_text()


def test_smoke_summaries_cover_every_variant_and_length(smoke: tuple[Path, dict]) -> None:
    _, study = smoke
    s = study["summaries"]
    lens = ["32", "64", "128", "256"]
    assert set(s["mqar"]["metrics"]["engine_acc"]) == {"mlp", "linear", "none", "mlp-h8", "mlp-h256"}
    assert set(s["mqar"]["metrics"]["forward_acc"]["mlp-softmax"]) == set(lens)  # served: not at all
    for task, metric in (("mqar", "engine_acc"), ("copy", "engine_token_acc"), ("lm", "nats_per_char")):
        for v in ("mlp", "linear", "none"):
            cells = s[task]["metrics"][metric][v]
            assert list(cells) == lens and all(c["n"] == 2 and c["ci95"] is not None for c in cells.values())
    pairs = {(c["first"], c["second"]) for c in s["mqar"]["comparisons"]}
    verdicts = {c["verdict"] for c in s["mqar"]["comparisons"]}
    assert verdicts <= {"mlp better", "linear better", "none better", "mlp-h8 better", "mlp-h256 better",
                        "mlp-softmax better", "no significant difference"}
    assert {("mlp", "linear"), ("mlp", "none"), ("mlp-softmax", "mlp")} <= pairs
    assert set(s["lm"]["position_loss"]) == {"mlp", "linear", "none"}
    for job in study["jobs"]:
        assert job["steps"] == study["tasks"][job["task"]]["steps"]  # the same budget for every run
        assert 0 < job["final_loss"] < 10
    engine, forward = (s["mqar"]["metrics"][m]["mlp"]["32"]["mean"] for m in ("engine_acc", "forward_acc"))
    assert abs(engine - forward) <= 1 / 8  # the serving path answers as the forward does (one tie allowed)
