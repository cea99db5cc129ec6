"""MQAR recall through the serving engine: train small models, evaluate recall by sequence length.

    python -m fenwick_llm.tools.mqar train --out runs/mqar/mlp --lambda-mode mlp
    python -m fenwick_llm.tools.mqar eval --model runs/mqar/mlp --out runs/mqar/mlp/eval.json
    python -m fenwick_llm.tools.mqar table runs/mqar/*/eval.json

Training uses short sequences (--train-mix); evaluation asks the engine (``LLM.generate``, greedy, one
token) for the value after a query key, for prompts that run up to that key, at lengths far beyond
training. A full-sequence forward with the quadratic reference (``--check-forward-max-len``) gives the same
accuracy independently, as a check on the serving path. Task layout: tools/mqar_data.py.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.tools import mqar_data as mq
from fenwick_llm.tools.modeldir import (
    build_model,
    check_model_dir,
    count_parameters,
    save_weights,
    write_json,
)
from fenwick_llm.tools.train_attn import ATTENTION_CHOICES, training_attention
from fenwick_llm.tools.trainer import TrainConfig, train

TASK_FILE = "mqar.json"


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _mix(s: str) -> list[tuple[int, int]]:
    """"64:4,128:8" -> [(64, 4), (128, 8)]: (sequence length, kv pairs) pairs."""
    out = []
    for item in s.split(","):
        T, _, n = item.partition(":")
        if not n:
            raise argparse.ArgumentTypeError(f"--train-mix items are LENGTH:KV_PAIRS, got {item!r}")
        out.append((int(T), int(n)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one model and write its model directory")
    t.add_argument("--out", required=True)
    t.add_argument("--lambda-mode", choices=("mlp", "linear", "none"), default="mlp")
    t.add_argument("--vocab-size", type=int, default=512)
    t.add_argument("--train-mix", type=_mix, default=_mix("64:4,128:8,256:16,256:32,512:32"),
                   help="LENGTH:KV_PAIRS items, cycled one per step (Zoology-style mixture)")
    t.add_argument("--num-kv-pairs", type=int, default=None,
                   help="kv pairs at evaluation (default: the most in --train-mix)")
    t.add_argument("--batch-tokens", type=int, default=32768, help="tokens per step (batch = this // length)")
    t.add_argument("--hidden", type=int, default=128)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--state-size", type=int, default=64)
    t.add_argument("--lambda-levels", type=int, default=15)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--lr", type=float, default=5e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--time-budget", type=float, default=0.0, help="seconds; > 0 compresses the schedule")
    t.add_argument("--attention", choices=ATTENTION_CHOICES, default="quadratic")
    t.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    e = sub.add_parser("eval", help="recall accuracy by sequence length through LLM.generate")
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True, help="results JSON")
    e.add_argument("--lens", type=_ints, default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    e.add_argument("--examples", type=int, default=256, help="prompts (independent examples) per length")
    e.add_argument("--budget", type=float, default=0.0, help="seconds; longer lengths are skipped past it")
    e.add_argument("--max-num-seqs", type=int, default=64)
    e.add_argument("--max-num-batched-tokens", type=int, default=32768)
    e.add_argument("--long-prefill-chunk", type=int, default=4096)
    e.add_argument("--check-forward-max-len", type=int, default=2048,
                   help="also score a full-sequence forward (quadratic reference) up to this length; "
                        "0: never")
    for sp in (t, e):
        sp.add_argument("--device", default="auto")
        sp.add_argument("--seed", type=int, default=0)
    tb = sub.add_parser("table", help="markdown table of accuracy by length from eval JSON files")
    tb.add_argument("results", nargs="+")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


# ---- training --------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace, argv: list[str]) -> dict:
    device = resolve_device(args.device)
    vocab = mq.MQARVocab(args.vocab_size)
    eval_pairs = args.num_kv_pairs or max(n for _, n in args.train_mix)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         head_dim=args.head_dim, state_size=args.state_size, lambda_mode=args.lambda_mode,
                         lambda_levels=args.lambda_levels, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = build_model(config, device, args.seed)
    print(f"[mqar] lambda_mode={args.lambda_mode} params={count_parameters(model):,} "
          f"heads={config.num_heads} train_mix={args.train_mix} eval kv_pairs={eval_pairs} "
          f"device={device}", flush=True)
    step = [0]

    def next_batch(_: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        T, n = args.train_mix[step[0] % len(args.train_mix)]
        step[0] += 1
        b = mq.generate(max(args.batch_tokens // T, 1), T, n, vocab, gen)
        return b.inputs.to(device, non_blocking=True), b.labels.to(device, non_blocking=True)

    val = [mq.generate(max(args.batch_tokens // T, 1), T, n, vocab, seed=1_000_000 + 1000 * T + n)
           for T, n in args.train_mix]

    def evaluate(m: torch.nn.Module) -> dict:
        losses, accs = [], {}
        for (T, n), b in zip(args.train_mix, val, strict=True):
            logits = m(b.inputs.to(device))
            labels = b.labels.to(device)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=mq.IGNORE)
            losses.append(float(loss))
            accs[f"acc_{T}x{n}"] = mq.score(logits.argmax(-1).cpu(), b)
        return {"val_loss": sum(losses) / len(losses), "val_acc": sum(accs.values()) / len(accs), **accs}

    cfg = TrainConfig(steps=args.steps, batch_size=0, lr=args.lr,
                      warmup=min(args.warmup, max(args.steps // 10, 1)), weight_decay=args.weight_decay,
                      amp=args.amp, eval_every=args.eval_every,
                      time_budget=args.time_budget, seed=args.seed)
    with training_attention(args.attention):
        res = train(model, next_batch, cfg, device, evaluate=evaluate, metric="val_loss",
                    desc=f"mqar-{args.lambda_mode}")
    save_weights(model, out, torch.float32)
    mq.save_tokenizer(vocab, out, config.max_model_len)
    task = {"vocab_size": args.vocab_size, "num_kv_pairs": eval_pairs,
            "train_mix": [list(x) for x in args.train_mix]}
    write_json(out / TASK_FILE, task)
    best = dict(res.evals)[res.best_step] if res.evals else {}
    command = "python -m fenwick_llm.tools.mqar " + shlex.join(argv)
    report = {"command": command, "args": vars(args), "task": task,
              "steps_run": res.steps_run, "train_seconds": round(res.seconds, 1),
              "stopped_by_budget": res.stopped_by_budget, "best_step": res.best_step, "best": best,
              "evals": [{"step": s, **m} for s, m in res.evals]}
    write_json(out / "train_report.json", report)
    check_model_dir(out)
    print(f"[mqar] lambda_mode={args.lambda_mode}: {res.steps_run} steps in {res.seconds:.0f} s, best step "
          f"{res.best_step}: {best}", flush=True)
    return report


# ---- evaluation through the engine -----------------------------------------------------------------------
def forward_accuracy(model: torch.nn.Module, batch: mq.MQARBatch, prompts: list[list[int]],
                     answers: list[int], device: torch.device) -> float:
    """The same queries scored from a full-sequence forward (quadratic reference attention, float32)."""
    hits = 0
    T = batch.inputs.shape[1]
    step = max(1, 16384 // T)
    with torch.no_grad(), training_attention("quadratic"):
        for a in range(0, len(prompts), step):
            x = batch.inputs[a:a + step].to(device)
            pred = model(x).argmax(-1).cpu()  # (b, T)
            for i in range(x.shape[0]):
                hits += int(pred[i, len(prompts[a + i]) - 1]) == answers[a + i]
    return hits / len(prompts)


def cmd_eval(args: argparse.Namespace, argv: list[str]) -> dict:
    from fenwick_llm.engine import LLM, SamplingParams
    from fenwick_llm.engine.loader import load_model

    device = resolve_device(args.device)
    model_dir = Path(args.model)
    task = json.loads((model_dir / TASK_FILE).read_text())
    vocab = mq.MQARVocab(task["vocab_size"])
    config = ModelConfig.from_file(model_dir)
    llm = LLM(str(model_dir), device=device.type, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, long_prefill_chunk=args.long_prefill_chunk,
              enforce_eager=True)  # one-token answers come from the prefill; no decode to capture
    ref = load_model(model_dir, device=device, dtype=torch.float32)[0] if args.check_forward_max_len else None
    greedy = SamplingParams(temperature=0.0, max_tokens=1)
    rows = []
    t0 = time.perf_counter()
    rate = 0.0  # prompt tokens per second through the engine, from the lengths done so far
    for T in args.lens:
        row: dict = {"seq_len": T}
        rows.append(row)
        if T > config.max_model_len:
            row["skipped"] = f"beyond max_model_len={config.max_model_len}"
            continue
        n = args.examples
        if args.budget and rate > 0:  # as many examples as the rest of the budget affords (at least 32)
            left = args.budget - (time.perf_counter() - t0)
            n = min(n, int(left * rate / (T / 2 + task["num_kv_pairs"])))  # mean prompt: T / 2 + pairs
        if n < min(32, args.examples):
            row["skipped"] = f"eval budget of {args.budget:.0f} s spent"
            continue
        seed = 2_000_000 + args.seed * 65536 + T  # disjoint from training's stream and validation seeds
        batch = mq.generate(n, T, task["num_kv_pairs"], vocab, seed=seed)
        prompts, answers = mq.eval_prompts(batch, seed=args.seed + T)
        t = time.perf_counter()
        outs = llm.generate(prompts, greedy)
        row["engine_acc"] = mq.accuracy([o.outputs[0].token_ids for o in outs], answers)
        row["engine_seconds"] = round(time.perf_counter() - t, 2)
        row["examples"] = n
        row["prompt_tokens"] = sum(len(p) for p in prompts)
        rate = row["prompt_tokens"] / max(row["engine_seconds"], 1e-3)
        if ref is not None and T <= args.check_forward_max_len:
            row["forward_acc"] = forward_accuracy(ref, batch, prompts, answers, device)
        print(f"[mqar-eval] {config.lambda_mode} T={T}: " + ", ".join(f"{k} {v}" for k, v in row.items()),
              flush=True)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    result = {"model": str(model_dir), "lambda_mode": config.lambda_mode, "task": task,
              "device": str(device) + gpu, "command": "python -m fenwick_llm.tools.mqar " + shlex.join(argv),
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    return result


def table(results: list[dict]) -> str:
    """Markdown: a row per lambda mode, a column per length: engine accuracy % (forward check in brackets)."""
    lens = sorted({r["seq_len"] for res in results for r in res["rows"]})
    lines = ["| lambda_mode | " + " | ".join(str(T) for T in lens) + " |",
             "| --- |" + " --- |" * len(lens)]
    for res in results:
        by = {r["seq_len"]: r for r in res["rows"]}
        cells = []
        for T in lens:
            r = by.get(T, {})
            if "engine_acc" not in r:
                cells.append("—")
                continue
            cell = f"{100 * r['engine_acc']:.1f}"
            if "forward_acc" in r:
                cell += f" ({100 * r['forward_acc']:.1f})"
            cells.append(cell)
        lines.append(f"| {res['lambda_mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | str:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.cmd == "train":
        return cmd_train(args, argv)
    if args.cmd == "eval":
        return cmd_eval(args, argv)
    text = table([json.loads(Path(p).read_text()) for p in args.results])
    print(text)
    return text


if __name__ == "__main__":
    main()
