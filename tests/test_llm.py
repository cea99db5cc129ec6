"""The offline engine on tiny random models (fp32, CPU): outputs checked against one full forward pass.

Greedy decoding is checked by teacher forcing: the argmax of a full forward over prompt + output at
each position must be the next generated token (the same as repeated argmax of full forwards).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.errors import InvalidRequestError, PromptTooLongError
from fenwick_llm.engine.outputs import CompletionOutput, RequestOutput

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPTS: list[str | list[int]] = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog. Once upon a time", [7, 8, 9, 10, 11]]


@pytest.fixture(scope="module", params=[False, True], ids=["serial", "overlap"])
def llm(tiny_model_dir: Path, request: pytest.FixtureRequest) -> LLM:
    """Each test runs twice: host and device in turn, and with the next decode step queued before the
    host reads a step's tokens (overlap_decode, the default with CUDA graphs)."""
    return LLM(str(tiny_model_dir), max_num_seqs=8, max_model_len=96, max_num_batched_tokens=32,
               long_prefill_chunk=16, overlap_decode=request.param)


def forward_logprobs(llm: LLM, out: RequestOutput, sample: int = 0) -> torch.Tensor:
    """log_softmax of one full forward over prompt + output[:-1] -> [len(output), vocab]."""
    ids = out.prompt_token_ids + out.outputs[sample].token_ids
    with torch.no_grad():
        model = llm.engine.model
        device = next(model.parameters()).device
        logits = model(torch.tensor([ids[:-1]], device=device))[0].float().cpu()  # (T - 1, vocab)
    return torch.log_softmax(logits[len(out.prompt_token_ids) - 1:], dim=-1)


# Greedy tokens of two code paths may differ at near-ties: a chosen token within this many nats of the
# best one counts as greedy (different sum orders move fp32 logits by ~1e-6 here)
GREEDY_EPS = 1e-4


def assert_greedy(llm: LLM, out: RequestOutput, eps: float = GREEDY_EPS, sample: int = 0) -> None:
    """Every generated token of ``out.outputs[sample]`` is the full forward's argmax, or within ``eps`` of
    it, along the sequence the engine generated."""
    lp = forward_logprobs(llm, out, sample)
    ids = torch.tensor(out.outputs[sample].token_ids)
    gap = lp.max(-1).values - lp.gather(-1, ids[:, None].to(lp.device))[:, 0]
    assert bool((gap <= eps).all()), f"tokens {ids.tolist()} trail the argmax by {gap.tolist()} nats"


@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_greedy_matches_full_forward(mode: str, llm: LLM, tiny_model_dir_linear: Path) -> None:
    engine = llm if mode == "mlp" else LLM(str(tiny_model_dir_linear), max_num_seqs=4, long_prefill_chunk=16)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=8, **GREEDY))
    assert [o.prompt_token_ids for o in outs][2] == PROMPTS[2] and outs[0].prompt == PROMPTS[0]
    for out in outs:
        assert len(out.outputs[0].token_ids) == 8 and out.outputs[0].finish_reason == "length"
        assert_greedy(engine, out)


def test_logprobs_are_log_softmax_of_the_logits(llm: LLM) -> None:
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, logprobs=3, temperature=0.9, seed=0))[0]
    ref = forward_logprobs(llm, out)
    comp = out.outputs[0]
    assert comp.logprobs is not None and len(comp.logprobs) == 6
    for t, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        assert lp.sampled.token_id == tok
        assert lp.sampled.logprob == pytest.approx(ref[t, tok].item(), abs=1e-4)
        assert [x.token_id for x in lp.top] == ref[t].topk(3).indices.tolist()
        assert [x.logprob for x in lp.top] == pytest.approx(ref[t].topk(3).values.tolist(), abs=1e-4)


def test_alone_equals_batched_with_staggered_arrivals(llm: LLM) -> None:
    core, params = llm.engine, SamplingParams(max_tokens=10, **GREEDY)
    alone = llm.generate(PROMPTS[1], params)[0].outputs[0].token_ids
    others = {1: [3] * 20, 2: [5, 6], 4: list(range(20, 37)), 6: [9]}  # step -> prompt of another request
    target = core.make_request("target", PROMPTS[1], params)
    finished: dict[str, list[int]] = {}
    step = 0
    while step <= max(others) or core.has_unfinished():
        if step == 3:
            core.add_request(target)
        if step in others:
            other = SamplingParams(max_tokens=7, **GREEDY)
            core.add_request(core.make_request(f"o{step}", others[step], other))
        finished.update((o.request_id, o.outputs[0].token_ids) for o in core.step() if o.finished)
        step += 1
    assert finished["target"] == alone


def _arrivals(llm: LLM, poison: bool) -> dict[str, RequestOutput]:
    """One-token prompts, long prompts in chunks, and fresh prompts beside continuing chunks, arriving at
    steps 0, 1 and 3; poison: every level of the pool set to NaN first."""
    core, params = llm.engine, SamplingParams(max_tokens=5, **GREEDY)
    if poison:
        for t in core.pool.state.levels:
            t.fill_(float("nan"))
    arrivals = {0: [[4], list(range(40, 70))], 1: [[5, 6, 7], [8]], 3: [list(range(10, 31)), [9, 9]]}
    outs: dict[str, RequestOutput] = {}
    step = 0
    while step <= max(arrivals) or core.has_unfinished():
        for j, prompt in enumerate(arrivals.get(step, [])):
            core.add_request(core.make_request(f"r{step}.{j}", prompt, params))
        outs.update((o.request_id, o) for o in core.step() if o.finished)
        step += 1
    return outs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_new_requests_start_clean_whatever_their_slots_hold(tiny_model_dir: Path, device: str) -> None:
    """Slots are zeroed lazily (levels only where no fresh prefill rewrites them all): with the pool's
    levels poisoned, every request decodes as on a clean pool (and, on the CPU, as a full forward)."""
    kw = dict(device=device, dtype="float32", max_num_seqs=6, max_model_len=96, max_num_batched_tokens=24,
              long_prefill_chunk=8)
    llm = LLM(str(tiny_model_dir), **kw)
    poisoned = _arrivals(llm, poison=True)
    clean = _arrivals(LLM(str(tiny_model_dir), **kw), poison=False)
    assert len(poisoned) == 6
    for rid, out in poisoned.items():
        assert out.outputs[0].token_ids == clean[rid].outputs[0].token_ids
        if device == "cpu":
            assert_greedy(llm, out)


def test_chunked_prefill_equals_one_shot(llm: LLM, tiny_model_dir: Path) -> None:
    prompt = list(range(30, 63))  # 33 tokens
    params = SamplingParams(max_tokens=5, logprobs=2, **GREEDY)
    chunked = LLM(str(tiny_model_dir), max_num_seqs=2, long_prefill_chunk=5).generate(prompt, params)[0]
    one_shot = LLM(str(tiny_model_dir), max_num_seqs=2, long_prefill_chunk=40).generate(prompt, params)[0]
    a, b = chunked.outputs[0], one_shot.outputs[0]
    assert a.token_ids == b.token_ids
    assert a.logprobs is not None and b.logprobs is not None
    assert [x.sampled.logprob for x in a.logprobs] == pytest.approx([x.sampled.logprob for x in b.logprobs],
                                                                    abs=1e-4)


def test_n_samples_fork_one_prefill(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    model = llm.engine.model
    run_prefill = model.run_prefill
    calls: list[int] = []

    def counted(batch, *args: object) -> torch.Tensor:
        calls.append(batch.layout.num_tokens)
        return run_prefill(batch, *args)

    monkeypatch.setattr(model, "run_prefill", counted)
    out = llm.generate(PROMPTS[1], SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=5, logprobs=0,
                                                  ignore_eos=True))[0]
    assert sum(calls) == len(out.prompt_token_ids)  # the prompt ran once for all three samples
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    for i, comp in enumerate(out.outputs):  # each fork continues from the shared prompt state exactly
        ref = forward_logprobs(llm, out, sample=i)
        assert comp.logprobs is not None
        got = [x.sampled.logprob for x in comp.logprobs]
        assert got == pytest.approx([ref[t, tok].item() for t, tok in enumerate(comp.token_ids)], abs=1e-4)


def test_seeded_sampling_reproduces_alone_and_in_a_batch(llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    free = SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], seeded)[0].outputs[0].token_ids
    batched = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [free, seeded, free])[1].outputs[0].token_ids
    assert batched == alone
    reseeded = SamplingParams(**{**seeded.__dict__, "seed": 99})
    assert llm.generate(PROMPTS[0], reseeded)[0].outputs[0].token_ids != alone


def _stream(llm: LLM, prompt: str | list[int], params: SamplingParams) -> list[CompletionOutput]:
    core = llm.engine
    core.add_request(core.make_request("stream", prompt, params))
    snaps: list[CompletionOutput] = []
    while core.has_unfinished():
        snaps += [o.outputs[0] for o in core.step()]
    return snaps


def test_stop_string_cuts_the_text_and_never_leaks_into_the_stream(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, **GREEDY)
    full = llm.generate(PROMPTS[0], params)[0].outputs[0]
    tok = llm.get_tokenizer()
    bounds = [len(tok.decode(full.token_ids[:j])) for j in range(1, len(full.token_ids))]
    text = full.text
    # a stop string that starts one character before a token boundary and ends after it
    cut = next(b for b in bounds[2:] if 0 < b - 1 and b + 2 <= len(text)
               and "\ufffd" not in text[b - 1:b + 2] and text.find(text[b - 1:b + 2]) == b - 1)
    stop = text[cut - 1:cut + 2]
    snaps = _stream(llm, PROMPTS[0], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    final = snaps[-1]
    assert final.text == text[:cut - 1] and final.finish_reason == "stop" and final.stop_reason == stop
    assert all(final.text.startswith(s.text) for s in snaps)  # nothing streamed is ever retracted
    keep = SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True, **GREEDY)
    kept = llm.generate(PROMPTS[0], keep)[0].outputs[0]
    assert kept.text == text[:cut + 2]


def test_stop_tokens_min_tokens_ignore_eos_and_max_tokens(llm: LLM) -> None:
    g = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids
    j = next(j for j in range(2, 8) if g[j] not in g[:j])  # a token first produced at position j
    stop_at = SamplingParams(max_tokens=8, stop_token_ids=[g[j]], **GREEDY)
    out = llm.generate(PROMPTS[2], stop_at)[0].outputs[0]
    assert out.token_ids == g[:j + 1] and out.finish_reason == "stop" and out.stop_reason == g[j]
    assert out.text == llm.get_tokenizer().decode(g[:j])  # the stop token stays out of the text
    late = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, min_tokens=j + 1, stop_token_ids=[g[j]],
                                                   **GREEDY))[0].outputs[0]
    assert g[j] not in late.token_ids[:j + 1] and len(late.token_ids) > j + 1
    inputs = llm.engine.inputs
    saved, inputs.eos_token_ids = inputs.eos_token_ids, frozenset({g[j]})
    try:
        eos = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0]
        ignored = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0]
    finally:
        inputs.eos_token_ids = saved
    assert eos.token_ids == g[:j + 1] and eos.finish_reason == "stop" and eos.stop_reason is None
    assert ignored.token_ids == g and ignored.finish_reason == "length"
    short = llm.generate(PROMPTS[2], SamplingParams(max_tokens=3, **GREEDY))[0].outputs[0]
    assert short.token_ids == g[:3] and short.finish_reason == "length"


def test_bad_requests_are_rejected_before_running(llm: LLM) -> None:
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([[1, 2], [3, vocab]], SamplingParams())
    with pytest.raises(PromptTooLongError):
        llm.generate([1] * 90, SamplingParams(max_tokens=10))
    with pytest.raises(PromptTooLongError):
        llm.generate([1] * 96, SamplingParams(max_tokens=None))
    with pytest.raises(InvalidRequestError, match="n="):
        llm.generate([1, 2], SamplingParams(n=9))
    out = llm.generate([1] * 90, SamplingParams(max_tokens=None, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"  # up to max_model_len
    assert llm.engine.pool.allocator.num_used == 0


def test_random_traffic_with_aborts_frees_every_slot(llm: LLM) -> None:
    rng = random.Random(0)
    core = llm.engine
    live: list[str] = []
    for i in range(200):
        n = rng.choice([1, 1, 2])
        params = SamplingParams(n=n, max_tokens=rng.randint(1, 3), temperature=rng.choice([0.0, 1.0]),
                                seed=rng.choice([None, i]), ignore_eos=True)
        prompt = [rng.randrange(1, 300) for _ in range(rng.randint(1, 6))]
        core.add_request(core.make_request(f"rand{i}", prompt, params))
        live.append(f"rand{i}")
        if rng.random() < 0.6:
            core.step()
        if rng.random() < 0.3:
            core.abort(live.pop(rng.randrange(len(live))))
    while core.has_unfinished():
        core.step()
        if rng.random() < 0.1 and core.scheduler.running:
            core.abort(rng.choice(list(core.scheduler.running)))
    assert core.pool.allocator.num_used == 0 and core.pool.allocator.num_free == core.pool.num_slots
    assert not core.requests and not core.sampler._generators and not core.outputs.text._detok


def test_overlap_decode_queues_steps_and_matches_serial(tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy with logprobs, seeded sampling with penalties, a stop string, EOS, and requests that
    finish at different steps while later ones arrive: the same outputs with and without overlap, and
    the overlapped engine really ran queued steps (and freed every slot)."""
    kw = dict(max_num_seqs=4, max_model_len=96, max_num_batched_tokens=24, long_prefill_chunk=8)
    serial = LLM(str(tiny_model_dir), overlap_decode=False, **kw)
    overlap = LLM(str(tiny_model_dir), overlap_decode=True, **kw)
    queued: list[int] = []
    runner = overlap.engine.runner
    decode_next = runner.decode_next
    monkeypatch.setattr(runner, "decode_next",
                        lambda ids, slots: queued.append(len(ids)) or decode_next(ids, slots))
    params = [SamplingParams(max_tokens=9, logprobs=2, **GREEDY),
              SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3, repetition_penalty=1.3),
              SamplingParams(max_tokens=20, temperature=0.0, stop=["e"]),
              SamplingParams(max_tokens=4, temperature=1.0, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=15, temperature=0.0)]
    prompts = [*PROMPTS, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "Tomorrow and tomorrow"]
    a = serial.generate(prompts, params)
    b = overlap.generate(prompts, params)
    assert queued, "no decode step was queued ahead"
    for x, y in zip(a, b, strict=True):
        assert y.outputs[0].token_ids == x.outputs[0].token_ids
        assert y.outputs[0].text == x.outputs[0].text
        assert y.outputs[0].finish_reason == x.outputs[0].finish_reason
        lx = [t.sampled.logprob for t in x.outputs[0].logprobs or []]
        ly = [t.sampled.logprob for t in y.outputs[0].logprobs or []]
        assert ly == pytest.approx(lx, abs=1e-5)
    assert overlap.engine.pool.allocator.num_used == 0


def test_state_pool_holds_the_levels_max_model_len_reaches(tiny_model_dir: Path) -> None:
    """max_model_len=96 needs 8 Fenwick levels of the model's 15: slots are that much smaller, and a
    request filling the whole length still decodes as the full forward says."""
    llm = LLM(str(tiny_model_dir), max_num_seqs=2, max_model_len=96)
    full = LLM(str(tiny_model_dir), max_num_seqs=2, max_model_len=llm.engine.model_config.max_model_len)
    state, c = llm.engine.pool.state, llm.engine.model_config
    assert state.num_levels == 8 < c.lambda_levels == full.engine.pool.state.num_levels
    per_level = c.num_hidden_layers * c.num_heads * (c.state_size * c.head_dim + 2) * 4
    assert full.engine.pool.bytes_per_slot - llm.engine.pool.bytes_per_slot == 7 * per_level
    out = llm.generate([list(range(3, 93))], SamplingParams(max_tokens=6, **GREEDY))[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 96
    assert_greedy(llm, out)


def test_llm_freezes_the_heap_it_starts_with(tiny_model_dir: Path) -> None:
    """The LLM edge freezes the heap: objects alive after start-up leave the collector's sight (a full
    collection would walk them all and stall a step); the engine core alone does not (tests build many)."""
    import gc

    from fenwick_llm.engine.config import EngineConfig
    from fenwick_llm.engine.engine_core import EngineCore
    gc.unfreeze()
    try:
        EngineCore(EngineConfig(str(tiny_model_dir), max_num_seqs=2))
        assert gc.get_freeze_count() == 0
        LLM(str(tiny_model_dir), max_num_seqs=2)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_bf16_state_runs(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), max_num_seqs=2, state_dtype="bf16")
    assert llm.engine.pool.state.levels[0].dtype == torch.bfloat16
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, **GREEDY))[0].outputs[0]
    assert len(out.token_ids) == 4


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager(tiny_model_dir: Path) -> None:
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, cuda_graph_batch_sizes=(1, 2, 4, 8))
    graphs, eager = LLM(str(tiny_model_dir), **kw), LLM(str(tiny_model_dir), enforce_eager=True, **kw)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    prompts = PROMPTS + [[20 + i] * (i + 2) for i in range(3)]  # 6 requests: batches padded to 8
    params = SamplingParams(max_tokens=12, logprobs=2, **GREEDY)
    a, b = graphs.generate(prompts, params), eager.generate(prompts, params)
    for x, y in zip(a, b, strict=True):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = [t.sampled.logprob for t in x.outputs[0].logprobs or []]
        ly = [t.sampled.logprob for t in y.outputs[0].logprobs or []]
        assert lx == pytest.approx(ly, abs=1e-4)
        assert_greedy(eager, y)
    assert graphs.engine.pool.allocator.num_used == 0


@pytest.mark.gpu
def test_cuda_graph_step_equals_eager_step_and_padding_touches_no_request(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), device="cuda", dtype="float32", max_num_seqs=8,
              cuda_graph_batch_sizes=(1, 4, 8))
    runner, state, dev = llm.engine.runner, llm.engine.pool.state, torch.device("cuda")
    tensors = lambda: [*state.levels, *state.conv, state.positions]  # noqa: E731
    slots = torch.tensor([0, 2, 5], device=dev)  # 3 rows run the size-4 graph with one padding row
    with torch.inference_mode():
        state.reset(torch.arange(8, device=dev))
        cu = torch.tensor([0, 3, 10, 22], device=dev)
        llm.engine.model.prefill(torch.randint(1, 300, (22,), device=dev), cu, state, slots)
        saved = [t.clone() for t in tensors()]
        ids = torch.tensor([5, 6, 7], device=dev)
        eager = runner.decode(ids.tolist(), slots.tolist(), eager=True).clone()
        after_eager = [t[:8].clone() for t in tensors()]
        for t, s in zip(tensors(), saved, strict=True):
            t.copy_(s)
        graph = runner.decode(ids.tolist(), slots.tolist()).clone()
        after_graph = [t[:8].clone() for t in tensors()]
    torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(after_graph, after_eager, strict=True):  # same writes; slots 1, 3, 4, 6, 7 untouched
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    untouched = [1, 3, 4, 6, 7]
    for a, s in zip(after_graph, saved, strict=True):
        assert torch.equal(a[untouched], s[untouched])
