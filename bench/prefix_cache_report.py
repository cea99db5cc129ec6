"""Compare bench/prefix_cache.sh's runs (cache on vs off) against issue 23's targets; markdown on stdout.

    python bench/prefix_cache_report.py runs/prefix-cache > runs/prefix-cache/report.md

Reads OUT/{on,off}/{multi-turn,shared,random}/serve.json (bench/serve.py, --save-requests) and writes
OUT/report.json beside them. Targets: multi-turn TTFT at turns >= 4 at least 5x lower with the cache and
greedy replies identical; shared prefix: prompt tokens prefilled <= 5% of those sent; no reuse: output
throughput within 2% of cache off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, mode: str, name: str) -> dict | None:
    path = out / mode / name / "serve.json"
    return json.loads(path.read_text())["runs"][0] if path.is_file() else None


def multi_turn(on: dict, off: dict) -> tuple[list[str], dict]:
    lines = ["## Multi-turn chat", "",
             "| turn | prompt tokens | hit rate (on) | TTFT median on / off ms | ratio "
             "| TTFT mean on / off ms | ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for a, b in zip(on["turns"], off["turns"], strict=True):
        if not a["ttft_ms"] or not b["ttft_ms"]:
            continue
        med = b["ttft_ms"]["median"] / a["ttft_ms"]["median"]
        mean = b["ttft_ms"]["mean"] / a["ttft_ms"]["mean"]
        if a["turn"] >= 4:
            ratios.append(mean)
        lines.append(f"| {a['turn']} | {a['mean_prompt_tokens']:.0f} | {a['hit_rate']:.1%} | "
                     f"{a['ttft_ms']['median']:.1f} / {b['ttft_ms']['median']:.1f} | {med:.2f}x | "
                     f"{a['ttft_ms']['mean']:.1f} / {b['ttft_ms']['mean']:.1f} | {mean:.2f}x |")
    replies_on = {(r["conversation"], r["turn"]): r for r in on.get("requests", [])}
    replies_off = {(r["conversation"], r["turn"]): r for r in off.get("requests", [])}
    same = sum(k in replies_on and replies_on[k]["text"] == r["text"] for k, r in replies_off.items())
    partings = first_partings(replies_on, replies_off)
    near = [g for g in partings if g < NEAR_TIE]
    worst = min(ratios) if ratios else 0.0
    best = max(ratios, default=0.0)
    lines += ["", f"Turns >= 4: TTFT (mean) {worst:.2f}x to {best:.2f}x lower with the cache "
              f"(target >= 5x: {'met' if worst >= 5 else 'NOT met'}). Greedy replies identical: {same} of "
              f"{len(replies_off)} (target: all; {'met' if same == len(replies_off) else 'NOT met'}; a reply "
              "that differs changes every later prompt of its conversation). Conversations whose replies "
              f"part: {len(partings)}, {len(near)} of them at a near-tie (the runner-up within {NEAR_TIE} "
              "nats "
              f"of the greedy token in either run; gaps where they part: "
              f"{', '.join(f'{g:.3g}' for g in sorted(partings)) or '-'}). Hit rate "
              f"{on['prefix_cache_hit_rate']:.1%}; output throughput {on['output_throughput']:.0f} vs "
              f"{off['output_throughput']:.0f} tok/s.", ""]
    return lines, {"ttft_ratio_turns_ge_4_min": worst, "identical_replies": same, "replies": len(replies_off),
                   "parting_gaps": partings, "hit_rate": on["prefix_cache_hit_rate"]}


NEAR_TIE = 0.1  # nats: bf16 logits carry 8 bits of mantissa, and restoring moves the chunk boundaries


def first_partings(on: dict, off: dict) -> list[float]:
    """For each conversation whose replies differ, at its first differing turn (same prompt in both runs):
    the smaller logprob gap between the greedy token and the runner-up where the tokens first differ."""
    gaps = []
    for conv in sorted({c for c, _ in off}):
        turn = 0
        while (conv, turn) in off and on.get((conv, turn), {}).get("text") == off[(conv, turn)]["text"]:
            turn += 1
        a, b = on.get((conv, turn)), off.get((conv, turn))
        if a is None or b is None or not a.get("tokens") or not b.get("tokens"):
            continue
        i = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=False)) if x != y),
                 min(len(a["tokens"]), len(b["tokens"])) - 1)
        gaps.append(min(a["gaps"][i], b["gaps"][i]))
    return gaps


def prefilled(run: dict) -> float:
    counted = run.get("server_counted") or {}
    return counted.get("fenwick_prompt_tokens_total", run["total_input_tokens"] - run["total_cached_tokens"])


def shared(on: dict, off: dict) -> tuple[list[str], dict]:
    sent = on["total_input_tokens"]
    frac = prefilled(on) / sent if sent else 1.0
    lines = ["## Shared system prompt", "",
             "| | requests | prompt tokens sent | prefilled by the server | share | TTFT median ms "
             "| total tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, run in (("on", on), ("off", off)):
        n = run["total_input_tokens"]
        lines.append(f"| cache {mode} | {run['completed']} | {n} | {prefilled(run):.0f} | "
                     f"{prefilled(run) / n if n else 0:.1%} | {run['ttft_ms'].get('median', 0):.1f} | "
                     f"{run['total_token_throughput']:.0f} |")
    lines += ["", f"Prompt tokens prefilled with the cache: {frac:.2%} of those sent (target <= 5%: "
              f"{'met' if frac <= 0.05 else 'NOT met'}).", ""]
    return lines, {"prefilled_share": frac}


def no_reuse(on: dict, off: dict) -> tuple[list[str], dict]:
    ratio = on["output_throughput"] / off["output_throughput"]
    lines = ["## No reuse (random prompts)", "",
             "| | output tok/s | total tok/s | TTFT median ms | TPOT median ms |",
             "|---|---:|---:|---:|---:|"]
    for mode, run in (("on", on), ("off", off)):
        lines.append(f"| cache {mode} | {run['output_throughput']:.1f} | "
                     f"{run['total_token_throughput']:.1f} | {run['ttft_ms'].get('median', 0):.1f} | "
                     f"{run['tpot_ms'].get('median', 0):.2f} |")
    lines += ["", f"Output throughput with the cache: {ratio:.3f}x of cache off (target >= 0.98x: "
              f"{'met' if ratio >= 0.98 else 'NOT met'}; one run each: mind the run-to-run spread).", ""]
    return lines, {"throughput_ratio": ratio}


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "runs/prefix-cache")
    lines = [f"# Prefix cache on vs off ({out})", ""]
    summary: dict[str, dict] = {}
    for name, fn in (("multi-turn", multi_turn), ("shared", shared), ("random", no_reuse)):
        on, off = load(out, "on", name), load(out, "off", name)
        if on is None or off is None or not on["completed"] or not off["completed"]:
            lines += [f"## {name}: missing or failed runs", ""]
            continue
        part, summary[name] = fn(on, off)
        lines += part
    commands = out / "commands.txt"
    if commands.is_file():
        lines += ["## Commands", "", "```", commands.read_text().rstrip(), "```"]
    print("\n".join(lines))
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    return 0 if len(summary) == 3 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
