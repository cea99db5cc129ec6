"""Offline generation throughput: Fenwick's engine vs FLA's ``LogLinearMamba2ForCausalLM.generate``, one run.

Same random weights for both (a ~250M log-linear Mamba-2: hidden 768, 24 layers, head_dim 64, state 128,
expand 2, vocab 32000). FLA runs only the linear λ mode, so the model directory is written twice with
the same seed: ``mlp`` (adaptive decay, Fenwick's headline) and ``linear`` (what FLA loads; Fenwick also
runs it, for a like-for-like row). Each batch: B random prompts of --prompt-len tokens, --new-tokens
greedy tokens with EOS ignored; output tokens/s = B * new_tokens / wall time (prefill included, as for
FLA's generate), after one untimed run of the same batch for each engine (two for Fenwick with prompt-step
CUDA graphs, which capture a prompt shape the second time it runs). The steps that carry prompt
tokens are summed ("prompt steps ms": prefill and the first sample). Fenwick's pure-decode steps (no
prompt tokens) also give a per-step time, set against floors at the measured device-to-device copy
bandwidth: reading the weights once per step; the level blocks the Fenwick step must move at the run's
positions (live levels read, two written: "live state floor"); and reading + writing every slot's full
Fenwick state (all L levels) once per step.

    python bench/engine.py --out docs/bench_engine.json            # H200: batches 1, 32, 256
    python bench/engine.py --tiny --out /tmp/bench_engine.json     # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.loader import save_model
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.engine.stats import EngineStats
from fenwick_llm.engine.tokenizer import Tokenizer
from fenwick_llm.kernels import pdl
from fenwick_llm.kernels.state import step_level_blocks, window_step_traffic
from fenwick_llm.tools.make_random_model import ascii_bpe, randomize_

BIG = dict(hidden_size=768, num_hidden_layers=24, head_dim=64, state_size=128, expand=2, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, head_dim=16, state_size=16, expand=2, vocab_size=512)


def write_model(path: Path, shape: dict[str, int], lambda_mode: str, dtype: torch.dtype, seed: int) -> Path:
    config = ModelConfig.from_dict({"model_type": "log_linear_mamba2", **shape, "lambda_mode": lambda_mode,
                                    "n_groups": 1, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0,
                                    "tie_word_embeddings": False})
    model = LogLinearMamba2ForCausalLM(config, device="cpu", dtype=dtype)
    randomize_(model, seed)
    return save_model(model, Tokenizer(ascii_bpe(shape["vocab_size"]), eos_token="<|endoftext|>"), path,
                      generation_config={"eos_token_id": 0, "pad_token_id": 0})


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * n * reps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=g).tolist()


def bench_fenwick(llm: LLM, batch: int, a: argparse.Namespace, vocab: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=a.new_tokens, ignore_eos=True)
    # warm-up at the timed shape: kernels, cuBLAS heuristics and allocator blocks of this batch
    llm.generate(prompts(batch, a.prompt_len, vocab, 10), params)
    steps: list[tuple[float, EngineStats]] = []
    listener = lambda s: steps.append((time.perf_counter(), s))  # noqa: E731
    llm.engine.add_stats_listener(listener)
    try:
        sync(llm.config.torch_device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts(batch, a.prompt_len, vocab, 2), params)
        sync(llm.config.torch_device)
        wall = time.perf_counter() - t0
    finally:
        llm.engine.stats_listeners.remove(listener)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    times = [t0] + [t for t, _ in steps]
    decode = [times[i + 1] - times[i] for i, (_, s) in enumerate(steps)
              if s.num_prompt_tokens == 0 and s.num_generation_tokens == batch]
    step_s = sorted(decode)[len(decode) // 2] if decode else float("nan")
    prompt = [(s.num_prompt_tokens, s.num_generation_tokens, (times[i + 1] - times[i]) * 1e3)
              for i, (_, s) in enumerate(steps) if s.num_prompt_tokens]
    prompt_s = sum(ms for *_, ms in prompt) / 1e3
    return dict(tokens_per_s=tokens / wall, wall_s=wall, output_tokens=tokens, prompt_steps_ms=prompt_s * 1e3,
                # each step that carried prompt tokens: (prompt tokens, tokens sampled, wall ms)
                prompt_steps=[(p, g, round(ms, 2)) for p, g, ms in prompt],
                decode_step_ms=step_s * 1e3,
                decode_tokens_per_s=batch / step_s if decode else float("nan"), decode_steps=len(decode))


def live_state_bytes(llm: LLM, a: argparse.Namespace) -> float:
    """State bytes one request's decode step moves, averaged over the run's decode positions, in every
    layer: the level blocks the Fenwick step reads and writes (``kernels.state.step_level_blocks``,
    deferred decay) or, with a token window, those of the windowed step plus the window rows it reads
    and the one it writes (``kernels.window.window_step_traffic``)."""
    mc = llm.engine.model_config
    state = llm.engine.pool.state
    H, block = mc.num_heads, mc.state_size * mc.head_dim * state.levels[0].element_size()
    positions = range(a.prompt_len, a.prompt_len + a.new_tokens - 1)
    if state.all_window is None:
        per_step = [sum(step_level_blocks(t)) * H * block for t in positions]
    else:  # a row: k of each group, v and the log-decay of each head
        win_k, win_v, win_g = (w[0, 0, 0, 0] for w in state.all_window)
        row = sum(w.numel() * w.element_size() for w in (win_k, win_v, win_g))
        per_step = [(r + wr) * H * block + (rows + 1) * row
                    for r, wr, rows in map(window_step_traffic, positions)]
    return sum(per_step) / max(len(per_step), 1) * mc.num_hidden_layers


def bench_fla(model_dir: Path, batch: int, a: argparse.Namespace, vocab: int, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    import fla  # noqa: F401  (registers the model with transformers)
    from fla.models import LogLinearMamba2ForCausalLM as FLAModel

    model = FLAModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, use_cache=True,
              pad_token_id=0)
    with torch.inference_mode():
        # warm-up at the timed shape, as for Fenwick (Triton autotuning of FLA's kernels included)
        model.generate(torch.tensor(prompts(batch, a.prompt_len, vocab, 1), device=device), **kw)
        ids = torch.tensor(prompts(batch, a.prompt_len, vocab, 2), device=device)
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        sync(device)
        wall = time.perf_counter() - t0
    tokens = (out.shape[1] - a.prompt_len) * batch
    del model
    return dict(tokens_per_s=tokens / wall, wall_s=wall, output_tokens=tokens)


def attempt(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:  # a failing peer or mode must not lose the other rows
        return dict(error=f"{type(e).__name__}: {e}"[:300])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON results (+ a .md table beside)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short run (checks the script on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 32 256 (tiny: 1 4)")
    ap.add_argument("--fla-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=None, help="default 512 (tiny: 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (tiny: 8)")
    ap.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--modes", nargs="+", default=["mlp", "linear"], choices=["mlp", "linear"])
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-overlap-decode", action="store_true", help="host and device in series (A/B)")
    ap.add_argument("--no-pdl", action="store_true", help="kernels without PDL (kernels/pdl.py)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    pdl.configure(not a.no_pdl)
    a.batches = a.batches or ([1, 4] if a.tiny else [1, 32, 256])
    a.prompt_len = a.prompt_len or (16 if a.tiny else 512)
    a.new_tokens = a.new_tokens or (8 if a.tiny else 128)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = TINY if a.tiny else BIG
    fla_batches = [] if a.no_fla or device.type != "cuda" else a.fla_batches
    bw = copy_bandwidth(device)
    result: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", shape=shape,
        prompt_len=a.prompt_len, new_tokens=a.new_tokens, dtype=str(dtype), state_dtype=a.state_dtype,
        copy_bandwidth_GBps=bw / 1e9, rows=[],
        note="FLA's generate needs CUDA (Triton); skipped on CPU" if device.type != "cuda" else "")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes:
            model_dir = write_model(Path(tmp) / mode, shape, mode, dtype, a.seed)
            llm = LLM(str(model_dir), device=str(device), dtype=dtype, state_dtype=a.state_dtype,
                      max_num_seqs=max(a.batches), max_model_len=a.prompt_len + a.new_tokens,
                      max_num_batched_tokens=max(a.max_num_batched_tokens, max(a.batches)),
                      long_prefill_chunk=a.prompt_len, enforce_eager=a.enforce_eager,
                      overlap_decode=False if a.no_overlap_decode else None)
            weights = sum(p.numel() * p.element_size() for n, p in llm.engine.model.named_parameters()
                          if "embeddings" not in n)
            state = llm.engine.pool.bytes_per_slot
            result["overlap_decode"] = llm.engine.config.use_overlap_decode
            for batch in a.batches:
                row = dict(engine="fenwick", lambda_mode=mode, batch=batch,
                           **attempt(bench_fenwick, llm, batch, a, shape["vocab_size"]))
                row["weights_floor_ms"] = weights / bw * 1e3
                row["state_floor_ms"] = 2 * batch * state / bw * 1e3
                row["live_state_floor_ms"] = batch * live_state_bytes(llm, a) / bw * 1e3
                result["rows"].append(row)
                print(row, flush=True)
            result["params_M"] = sum(p.numel() for p in llm.engine.model.parameters()) / 1e6
            result["state_MiB_per_request"] = state / 2**20
            del llm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if mode == "linear":
                for batch in fla_batches:
                    row = dict(engine="fla.generate", lambda_mode=mode, batch=batch,
                               **attempt(bench_fla, model_dir, batch, a, shape["vocab_size"], device, dtype))
                    result["rows"].append(row)
                    print(row, flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    a.out.with_suffix(".md").write_text(markdown(result, a))
    print(markdown(result, a))


def markdown(r: dict[str, Any], a: argparse.Namespace) -> str:
    def f(x: Any, p: int = 1) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"

    head = (f"Device: {r['device']}; {r.get('params_M', 0):.0f} M params ({r['dtype']}), state "
            f"{r.get('state_MiB_per_request', 0):.1f} MiB/request ({r['state_dtype']}); "
            f"prompt {r['prompt_len']}, {r['new_tokens']} new tokens, greedy; "
            f"copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s. {r['note']}")
    cols = ["engine", "λ", "batch", "output tok/s", "prompt steps ms", "decode step ms", "decode tok/s",
            "weights floor ms", "live state floor ms", "state r+w floor ms", "error"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for x in r["rows"]:
        lines.append(f"| {x['engine']} | {x['lambda_mode']} | {x['batch']} | {f(x.get('tokens_per_s'))} | "
                     f"{f(x.get('prompt_steps_ms'))} | {f(x.get('decode_step_ms'), 2)} | "
                     f"{f(x.get('decode_tokens_per_s'))} | "
                     f"{f(x.get('weights_floor_ms'), 3)} | {f(x.get('live_state_floor_ms'), 3)} | "
                     f"{f(x.get('state_floor_ms'), 3)} | "
                     f"{x.get('error', '')} |")
    lines.append(f"\nCommand: python {' '.join(sys.argv)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
