"""Train a byte-level BPE tokenizer and a log-linear Mamba-2 on a text file; write a model directory.

    python -m fenwick_llm.tools.train --text .data/tinyshakespeare.txt --out models/fenwick-shakespeare

The last 10% of the characters are held out (never seen by the tokenizer or the model) and the
report gives the held-out loss in nats per character: mean token loss × tokens / characters.
The directory gets config.json, model.safetensors, tokenizer.json, tokenizer_config.json (chat
template), generation_config.json and train_report.json (losses, timings, the command).
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.tools import data
from fenwick_llm.tools.modeldir import (
    DTYPES,
    build_model,
    check_model_dir,
    count_parameters,
    save_weights,
    write_json,
)
from fenwick_llm.tools.train_attn import ATTENTION_CHOICES, training_attention
from fenwick_llm.tools.trainer import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, help="training text (UTF-8)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the text")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--chat-fraction", type=float, default=0.2,
                   help="share of training windows drawn from the text rendered as chats (speech → reply)")
    # model
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=None,
                   help="value heads; sets head_dim = expand * hidden / heads (overrides --head-dim)")
    p.add_argument("--state-size", type=int, default=64)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--n-groups", type=int, default=1)
    p.add_argument("--lambda-mode", choices=("mlp", "linear", "none"), default="mlp")
    p.add_argument("--lambda-mlp-hidden", type=int, default=64)
    p.add_argument("--lambda-levels", type=int, default=15)
    p.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=True)
    # optimisation
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; > 0 compresses the LR schedule so that training ends within it")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="quadratic",
                   help="training attention: quadratic (differentiable, default), naive (fp32 reference), "
                        "kernel (kernels.chunk_log_linear_attn; needs a backward)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sample-tokens", type=int, default=64,
                   help="after saving, generate this many tokens through engine.LLM (0: skip)")
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    return dev


def heldout_loss(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Mean token loss (nats) over every token of ``stream`` but the first."""
    total, count = torch.zeros((), device=stream.device, dtype=torch.float64), 0
    wins = list(data.eval_windows(stream, seq_len))
    full = [w for w in wins if w[0].shape[1] == seq_len]
    groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in wins if w[0].shape[1] != seq_len]
    for grp in groups:
        x = torch.cat([w[0] for w in grp])
        y = torch.cat([w[1] for w in grp])
        logits = model(x)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        count += y.numel()
    return float(total) / count


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = Path(args.text).read_bytes()
    text = raw.decode("utf-8")
    train_text, val_text = data.split_text(text, args.val_fraction)

    tok = data.train_tokenizer(train_text, args.vocab_size)
    eos, pad = tok.token_to_id(data.EOS), tok.token_to_id(data.PAD)
    train_ids = data.encode(tok, train_text).to(device)
    val_ids = data.encode(tok, val_text).to(device)
    streams, weights = [train_ids], [1.0 - args.chat_fraction]
    chat_ids = None
    if args.chat_fraction > 0:
        chat_ids = data.encode(tok, "".join(data.chat_documents(train_text))).to(device)
        streams.append(chat_ids)
        weights.append(args.chat_fraction)
    sampler = data.WindowSampler(streams, weights, args.seq_len)
    chars_per_token = len(val_text) / val_ids.numel()
    print(f"[data] {len(text):,} chars: train {len(train_text):,} → {train_ids.numel():,} tokens, held-out "
          f"{len(val_text):,} → {val_ids.numel():,} tokens ({chars_per_token:.3f} chars/token), chat "
          f"{0 if chat_ids is None else chat_ids.numel():,} tokens; vocab {tok.get_vocab_size()}", flush=True)

    if args.heads is not None:
        if (args.expand * args.hidden) % args.heads:
            raise SystemExit(f"--heads {args.heads} does not divide expand * hidden "
                             f"({args.expand * args.hidden})")
        args.head_dim = args.expand * args.hidden // args.heads
    config = ModelConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, num_hidden_layers=args.layers,
        head_dim=args.head_dim, state_size=args.state_size, expand=args.expand, n_groups=args.n_groups,
        lambda_mode=args.lambda_mode, lambda_mlp_hidden=args.lambda_mlp_hidden,
        lambda_levels=args.lambda_levels, tie_word_embeddings=args.tie_embeddings, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=pad,
    )
    model = build_model(config, device, args.seed)
    n_params = count_parameters(model)
    save_dtype = DTYPES[args.save_dtype]
    print(f"[model] lambda_mode={args.lambda_mode} hidden={args.hidden} layers={args.layers} heads="
          f"{config.num_heads} params={n_params:,} (~{n_params * save_dtype.itemsize / 2**20:.1f} MiB in "
          f"{args.save_dtype}); device={device} amp={args.amp and device.type == 'cuda'} "
          f"attention={args.attention}", flush=True)

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      min_lr_ratio=args.min_lr_ratio, warmup=min(args.warmup, max(args.steps // 10, 1)),
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, dropout=args.dropout,
                      amp=args.amp, eval_every=args.eval_every, time_budget=args.time_budget, seed=args.seed)

    def evaluate(m: torch.nn.Module) -> dict:
        loss = heldout_loss(m, val_ids, args.seq_len, args.batch_size)
        return {"val_loss": loss, "val_nats_per_char": loss / chars_per_token}

    with training_attention(args.attention):
        res = train(model, sampler, cfg, device, evaluate=evaluate, metric="val_loss", desc=args.lambda_mode)
        model.eval()
        with torch.no_grad():
            final = evaluate(model)  # the best checkpoint's (train() restores it), in float32
    print(f"[result] lambda_mode={args.lambda_mode}: held-out {final['val_nats_per_char']:.4f} nats/char "
          f"({final['val_loss']:.4f} nats/token) at step {res.best_step} of {res.steps_run} "
          f"({res.seconds:.0f} s{', schedule compressed by --time-budget' if res.stopped_by_budget else ''})",
          flush=True)

    save_weights(model, out, save_dtype, generation_config={
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": True,
        "temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1, "max_new_tokens": 256,
    })
    data.save_tokenizer(tok, out, config.max_model_len)
    report = {
        "command": "python -m fenwick_llm.tools.train " + shlex.join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "text": {"path": args.text, "chars": len(text), "sha256": hashlib.sha256(raw).hexdigest()},
        "tokens": {"train": train_ids.numel(), "heldout": val_ids.numel(),
                   "chat": 0 if chat_ids is None else chat_ids.numel()},
        "heldout_chars": len(val_text),
        "params": n_params,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "steps_run": res.steps_run,
        "train_seconds": round(res.seconds, 1),
        "stopped_by_budget": res.stopped_by_budget,
        "best_step": res.best_step,
        "heldout_loss_per_token": final["val_loss"],
        "heldout_nats_per_char": final["val_nats_per_char"],
        "evals": [{"step": s, **m} for s, m in res.evals],
        "train_losses": [{"step": s, "loss": v}
                         for s, v in res.train_losses[:: max(len(res.train_losses) // 200, 1)]],
    }
    write_json(out / "train_report.json", report)
    check_model_dir(out)
    if args.sample_tokens > 0:
        print(f"[sample] {sample(out, device, args.sample_tokens)!r}", flush=True)
    print(f"[done] wrote {out} in {time.perf_counter() - t_start:.0f} s", flush=True)
    return report


def sample(model_dir: Path, device: torch.device, max_tokens: int) -> str:
    """A greedy continuation of a play-script prompt through the serving engine."""
    from fenwick_llm.engine import LLM, SamplingParams

    llm = LLM(str(model_dir), device=device.type, max_num_seqs=2)
    outs = llm.generate(["ROMEO:\n"], SamplingParams(temperature=0, max_tokens=max_tokens))
    return "ROMEO:\n" + outs[0].outputs[0].text


if __name__ == "__main__":
    main()
