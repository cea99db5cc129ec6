"""Statistics of the adaptive-decay study: mean and 95 % t-interval over seeds per (task, variant, metric,
length), paired differences between variants (same seed = same training stream and evaluation data),
and the markdown summary."""

from __future__ import annotations

import math
from collections import defaultdict

from fenwick_llm.tools.decay_models import MAIN_VARIANTS

# two-sided 95 % quantiles of Student's t by degrees of freedom (1.96 past 30)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]

# per task: (metric, "max" if higher is better else "min")
METRICS = {
    "mqar": [("engine_acc", "max"), ("forward_acc", "max"), ("forward_acc_all", "max")],
    "copy": [("engine_token_acc", "max"), ("engine_exact", "max"), ("forward_token_acc", "max"),
             ("forward_exact", "max")],
    "lm": [("nats_per_char", "min")],
}
# the comparisons summary.md lists (study.json has every metric's)
PRIMARY = {"mqar": ("engine_acc", "forward_acc_all"), "copy": ("engine_token_acc", "engine_exact"),
           "lm": ("nats_per_char",)}
MAIN_PAIRS = [("mlp", "linear"), ("mlp", "none"), ("linear", "none")]
ABLATION_BASE = "mlp"


def t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96


def interval(values: list[float]) -> dict:
    """Mean, sample std and the 95 % t-interval half-width (None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "std": None, "n": n, "values": values}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": t95(n - 1) * std / math.sqrt(n), "std": std, "n": n, "values": values}


def overlap(a: dict, b: dict) -> bool | None:
    if a["ci95"] is None or b["ci95"] is None:
        return None
    return a["mean"] - a["ci95"] <= b["mean"] + b["ci95"] and b["mean"] - b["ci95"] <= a["mean"] + a["ci95"]


def _by_seed(jobs: list[dict], metric: str) -> dict[str, dict[str, dict[int, float]]]:
    """variant -> length -> seed -> value, from the jobs that finished."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for j in jobs:
        if j.get("status") != "ok":
            continue
        for T, row in j["eval"].items():
            if metric in row:
                out[j["variant"]][T][j["seed"]] = row[metric]
    return out


def compare(a: dict[int, float], b: dict[int, float], goal: str) -> dict:
    """Paired difference a - b over the seeds both have; the verdict says which is better, if either."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"n": 0, "verdict": "no common seeds"}
    d = interval([a[s] - b[s] for s in seeds])
    res = {"n": len(seeds), "diff": d["mean"], "ci95": d["ci95"]}
    if d["ci95"] is None:
        return {**res, "verdict": "one seed: no interval"}
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    sign = 1 if goal == "max" else -1
    if lo > 0 or hi < 0:
        better = (d["mean"] * sign) > 0
        return {**res, "verdict": "first better" if better else "second better"}
    return {**res, "verdict": "no significant difference"}


def summarize_task(task: str, jobs: list[dict], variants: list[str]) -> dict:
    jobs = [j for j in jobs if j["task"] == task]
    out: dict = {"metrics": {}, "comparisons": [], "runs": {}}
    for metric, goal in METRICS[task]:
        data = _by_seed(jobs, metric)
        table = {v: {T: interval([vals[s] for s in sorted(vals)]) for T, vals in sorted(
            data[v].items(), key=lambda kv: int(kv[0]))} for v in variants if v in data}
        if not table:
            continue
        out["metrics"][metric] = table
        pairs = [p for p in MAIN_PAIRS if p[0] in data and p[1] in data]
        pairs += [(v, ABLATION_BASE) for v in variants
                  if v not in MAIN_VARIANTS and v in data and ABLATION_BASE in data]
        for a, b in pairs:
            for T in sorted(set(data[a]) & set(data[b]), key=int):
                c = compare(data[a][T], data[b][T], goal)
                c["verdict"] = c["verdict"].replace("first", a).replace("second", b)
                c.update(metric=metric, length=int(T), first=a, second=b,
                         intervals_overlap=overlap(table[a][T], table[b][T]))
                out["comparisons"].append(c)
    for v in variants:
        ok = [j for j in jobs if j["variant"] == v and j.get("status") == "ok"]
        if not ok:
            continue
        out["runs"][v] = {"seeds": sorted(j["seed"] for j in ok), "params": ok[0]["params"],
                          "steps": sorted({j["steps"] for j in ok}),
                          "train_seconds_mean": round(sum(j["train_seconds"] for j in ok) / len(ok), 1),
                          "final_loss": interval([j["final_loss"] for j in ok if j["final_loss"]]),
                          "lambda_by_level": _mean_profile([j["lambda_by_level"] for j in ok])}
    if task == "lm":
        out["position_loss"] = _position_loss(jobs, variants)
    return out


def _mean_profile(profiles: list[list[list[float | None]]]) -> list[list[float | None]]:
    """Mean over runs of λ by layer and level (None where no run reached the level)."""
    if not profiles or not profiles[0]:
        return []
    out = []
    for i in range(len(profiles[0])):
        row = []
        for l in range(len(profiles[0][i])):
            vals = [p[i][l] for p in profiles if p[i][l] is not None]
            row.append(round(sum(vals) / len(vals), 4) if vals else None)
        out.append(row)
    return out


def _position_loss(jobs: list[dict], variants: list[str]) -> dict:
    out = {}
    for v in variants:
        rows = [r for j in jobs if j["variant"] == v and j.get("status") == "ok" for r in j["eval"].values()
                if "position_loss" in r]
        if rows:
            bins = list(zip(*(r["position_loss"] for r in rows), strict=True))
            out[v] = {"edges": rows[0]["position_edges"], "bins": [interval(list(b)) for b in bins]}
    return out


def _cell(s: dict | None, pct: bool) -> str:
    if s is None:
        return "—"
    k = 100.0 if pct else 1.0
    ci = "" if s["ci95"] is None else f" ± {k * s['ci95']:.{1 if pct else 3}f}"
    return f"{k * s['mean']:.{1 if pct else 3}f}{ci} (n={s['n']})"


def markdown(summaries: dict[str, dict]) -> str:
    lines = []
    for task, summ in summaries.items():
        for metric, table in summ["metrics"].items():
            pct = metric != "nats_per_char"
            lens = sorted({T for rows in table.values() for T in rows}, key=int)
            lines += [f"### {task}: {metric}{' (%)' if pct else ''}, mean ± 95 % t-interval over seeds", "",
                      "| variant | " + " | ".join(lens) + " |", "| --- |" + " --- |" * len(lens)]
            lines += [f"| {v} | " + " | ".join(_cell(rows.get(T), pct) for T in lens) + " |"
                      for v, rows in table.items()]
            lines.append("")
        if "position_loss" in summ and summ["position_loss"]:
            first = next(iter(summ["position_loss"].values()))
            edges = first["edges"]
            heads = [f"{a}–{b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
            lines += [f"### {task}: held-out loss by position at the longest window (nats/char)", "",
                      "| variant | " + " | ".join(heads) + " |", "| --- |" + " --- |" * len(heads)]
            lines += [f"| {v} | " + " | ".join(_cell(b, False) for b in pl["bins"]) + " |"
                      for v, pl in summ["position_loss"].items()]
            lines.append("")
        shown = [c for c in summ["comparisons"] if c["metric"] in PRIMARY.get(task, ())]
        if shown:
            lines += [f"### {task}: paired differences (first − second, same seeds)", "",
                      "| metric | length | first | second | diff ± 95 % | n | verdict | intervals overlap |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for c in shown:
                k, d = (1.0, 4) if c["metric"] == "nats_per_char" else (100.0, 1)
                diff = "—" if "diff" not in c else f"{k * c['diff']:+.{d}f}" + (
                    "" if c["ci95"] is None else f" ± {k * c['ci95']:.{d}f}")
                lines.append(f"| {c['metric']} | {c['length']} | {c['first']} | {c['second']} | {diff} | "
                             f"{c['n']} | {c['verdict']} | {c['intervals_overlap']} |")
            lines.append("")
    return "\n".join(lines)
