"""The study's report from finished runs: results.csv (one row per run and seed), report.md and plots/.

report.md mirrors the paper: Table 1 (ID / replacement / fusion), Figure 2 (caption- vs hidden-state-centric), the
layer sweep of Figure 3, Table 2 (mean +- std over seeds, best bold, second underlined, DFF's relative improvement over
the strongest baseline, paired t-tests over seeds as Table 2's asterisks), then what the paper does not report:
metrics sliced by how often the target item was seen in training, DFF's learned layer weights and the gate's
distribution, and a "Findings" section that checks the paper's three findings against these numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from dff_jax import plots
from dff_jax.errors import UserError

MAIN_METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")
KEY_METRICS = ("HR@10", "NDCG@10")
NAMES = {
    "id": "ID only (IDRec)",
    "replace": "Replacement (last layer)",
    "fusion_last": "Fusion, last layer (HC)",
    "fusion_mean": "Fusion, mean of layers",
    "dff": "DFF (learned alpha + gate)",
    "fusion_mean_raw": "Fusion, mean of raw layers (Eq. 5 exactly)",
    "dff_raw": "DFF over raw layers (Eq. 5 exactly)",
    "caption": "Fusion, caption embedding (CC)",
}
ALPHA = 0.05  # Table 2: significant at p < 0.05


class ReportError(UserError):
    """No finished run to report, or an unreadable results.json (the message names the file)."""


MODALITIES = ("title", "cover", "video", "image", "frames", "text")


def set_kind(run: str) -> str | None:
    """For a `set_<name>` row: "prompt" (paper Table 3), "modality" (Table 4) or "other", by its name."""
    if not run.startswith("set_"):
        return None
    name = run.removeprefix("set_").lower()
    if "prompt" in name:
        return "prompt"
    return "modality" if any(m in name for m in MODALITIES) else "other"


def run_name(run: str, found: dict | None = None) -> str:
    """The row's label; for the mean of layers and DFF it says whether the layers were standardised (then the
    aggregation is a re-weighting of Eq. 5, not its formula) when the finished runs' config tells."""
    if run.startswith("set_"):
        return f"DFF on the `{run.removeprefix('set_')}` feature set"
    name = NAMES.get(run, f"Fusion, layer {run.split('_', 1)[1]}" if run.startswith("layer_") else run)
    if found and run in ("fusion_mean", "dff") and run in found:
        norm = next(iter(found[run].values())).get("config", {}).get("model", {}).get("feature_norm")
        if norm and norm != "none":
            name += f" ({'standardised' if norm == 'standardize' else norm} layers)"
    return name


# ------------------------------------------------------------------------------------------------------ collect


def bin_order(slices: dict) -> list[str]:
    """Cold-start bin names ("0", "1-4", "5-19", "20+") by their lower edge (results.json stores keys sorted as text)."""
    return sorted(slices, key=lambda b: int(b.split("-")[0].rstrip("+")))


def _seeds(run_dir: Path, seeds: int | None = None) -> dict[int, dict]:
    """{seed_index: results.json} of the finished seeds in `run_dir` (`seed<k>/results.json`), the first `seeds`
    seed indices only (a `--seeds 3` report of a folder that also holds seeds 3 and 4 is a 3-seed report)."""
    found = {}
    for d in sorted(run_dir.glob("seed*")):
        f = d / "results.json"
        if not f.is_file() or not d.name[4:].isdigit() or (seeds is not None and int(d.name[4:]) >= seeds):
            continue
        try:
            found[int(d.name[4:])] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{f}: not valid JSON ({e}); delete the run folder {d} to retrain it") from None
    return found


def collect(
    out: Path, runs: list[str], points: list[str] = (), metric: str = "NDCG@10", seeds: int | None = None
) -> dict[str, dict[int, dict]]:
    """{run: {seed_index: results.json}} for every finished (run, seed < `seeds`) under `out/runs` among `runs`.

    With grid `points` (`study --grid`), each run's seeds are those of the point `select_points` picks on validation.
    """
    found: dict[str, dict[int, dict]] = {}
    for run in runs:
        if points:
            per_point = {p: _seeds(out / "runs" / run / p, seeds) for p in points}
            chosen = select_points({p: r for p, r in per_point.items() if r}, metric)
            got = per_point[chosen] if chosen else {}
        else:
            got = _seeds(out / "runs" / run, seeds)
        if got:
            found[run] = got
    if not found:
        raise ReportError(f"{out}/runs: no finished run (results.json) among {', '.join(runs)}")
    return found


def select_points(per_point: dict[str, dict[int, dict]], metric: str) -> str | None:
    """The grid point with the best validation `metric` at the selected epoch, averaged over the point's finished
    seeds (one setting per row: paper section 6.2 selects on validation; the test numbers are never looked at)."""
    if not per_point:
        return None
    return max(per_point, key=lambda p: mean_std(r["best_valid"][metric] for r in per_point[p].values())[0])


def grid_table(out: Path, runs: list[str], points: list[str], metric: str, seeds: int | None = None) -> str:
    """Per row: the validation `metric` (mean over finished seeds) at every grid point, the selected one in bold."""
    lines = ["| run | " + " | ".join(f"`{p}`" for p in points) + " | selected |", "|---|" + "---|" * (len(points) + 1)]
    for run in runs:
        per_point = {p: _seeds(out / "runs" / run / p, seeds) for p in points}
        chosen = select_points({p: r for p, r in per_point.items() if r}, metric)
        if chosen is None:
            continue
        cells = []
        for p in points:
            if not per_point[p]:
                cells.append("–")
                continue
            m = mean_std(r["best_valid"][metric] for r in per_point[p].values())[0]
            cell = f"{m:.4f} ({len(per_point[p])})"
            cells.append(f"**{cell}**" if p == chosen else cell)
        lines.append(f"| {run_name(run)} | " + " | ".join(cells) + f" | `{chosen}` |")
    return "\n".join(lines) + "\n"


def flat_row(run: str, seed: int, result: dict) -> dict:
    """One results.csv row: test metrics, training summary, gate mean and the cold-start slices."""
    test = result["test"]
    row = {"run": run, "seed": seed, "config_seed": result.get("config", {}).get("seed")}
    row.update({k: v for k, v in test.items() if isinstance(v, float)})
    row["num_users"] = test.get("num_users")
    row.update({k: result.get(k) for k in ("best_epoch", "epochs_run", "seconds_per_epoch", "param_count")})
    row["gate_mean"] = result.get("analysis", {}).get("gate_mean")
    slices = test.get("cold_start", {})
    for bin_name in bin_order(slices):
        for k, v in slices[bin_name].items():
            row[f"cold[{bin_name}]/{k}"] = v
    return row


def write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ statistics


def values(found: dict, run: str, metric: str) -> dict[int, float]:
    return {s: r["test"][metric] for s, r in found.get(run, {}).items() if metric in r["test"]}


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed)."""
    a = np.asarray(list(xs), np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def seed_stats(found: dict, run: str, metric: str) -> tuple[float, float]:
    """Mean and sample std over the seeds of `run` for one test metric."""
    return mean_std(values(found, run, metric).values())


def seed_mean(found: dict, run: str, metric: str) -> float | None:
    """Mean over the seeds of `run` (None when the run has no finished seed)."""
    return seed_stats(found, run, metric)[0] if run in found else None


def valid_mean(found: dict, run: str, metric: str) -> float:
    """Mean over the seeds of `run` of the validation metric at the selected (best) epoch.

    Every choice the report makes (the best single layer, the strongest baseline) is made on this, as the paper
    selects on validation (section 6.2): choosing on test means would bias the reported test numbers upwards."""
    return mean_std(r["best_valid"][metric] for r in found[run].values())[0]


def paired_p(a: dict[int, float], b: dict[int, float]) -> float:
    """Two-sided paired t-test over the seeds both runs finished (paper Table 2); nan below 2 pairs or 0 variance."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return math.nan
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    d = x - y
    if np.allclose(d, d[0]):  # constant difference: t is undefined (0/0 or x/0)
        return math.nan
    return float(stats.ttest_rel(x, y).pvalue)


def fmt(m: float, s: float) -> str:
    return f"{m:.4f} ± {s:.4f}"


def fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}") + ("*" if p < ALPHA else "")


def table(found: dict, runs: list[str], metrics=MAIN_METRICS, mark=True, label=run_name) -> str:
    """Markdown table of mean ± std over seeds; per column the best is bold and the second underlined."""
    runs = [r for r in runs if r in found]
    if not runs:
        return "_no finished run_\n"
    stats = {(r, m): seed_stats(found, r, m) for r in runs for m in metrics}
    seeds = {r: len(found[r]) for r in runs}
    order = {m: sorted(runs, key=lambda r: -stats[(r, m)][0]) for m in metrics}
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for r in runs:
        cells = []
        for m in metrics:
            c = fmt(*stats[(r, m)]) if seeds[r] > 1 else f"{stats[(r, m)][0]:.4f}"  # one seed: no std
            if mark and len(runs) > 1 and order[m][0] == r:
                c = f"**{c}**"
            elif mark and len(runs) > 2 and order[m][1] == r:
                c = f"<u>{c}</u>"
            cells.append(c)
        lines.append(f"| {label(r)} | {len(found[r])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_layer(found: dict, metric: str = "NDCG@10") -> str | None:
    """The single-layer run with the best validation `metric` (mean over seeds)."""
    layers = [r for r in found if r.startswith("layer_")]
    return max(layers, key=lambda r: valid_mean(found, r, metric)) if layers else None


# ------------------------------------------------------------------------------------------------------ sections


def main_table(found: dict) -> tuple[str, dict]:
    """Table 2: baselines and DFF, DFF's relative improvement and paired t-test p-values against each baseline."""
    baselines = [
        r
        for r in ("id", "replace", "caption", "fusion_last", "fusion_mean", "fusion_mean_raw", "dff_raw")
        if r in found
    ]
    bl = best_layer(found)
    if bl and found[bl] is not found.get("fusion_last"):  # the last layer's sweep entry is fusion_last itself
        baselines.append(bl)
    rows = baselines + (["dff"] if "dff" in found else [])
    text = table(found, rows, label=lambda r: run_name(r, found) + (" (best single layer)" if r == bl else ""))
    info = {"strongest": {}, "improvement": {}, "p": {}}
    if "dff" not in found or not baselines:
        return text + "\n_DFF or baselines missing: no improvement or significance test._\n", info
    dff = {m: values(found, "dff", m) for m in MAIN_METRICS}
    imp_cells, strong_cells = [], []
    for m in MAIN_METRICS:
        strongest = max(baselines, key=lambda r: valid_mean(found, r, m))  # chosen on validation
        base = seed_mean(found, strongest, m)
        dm = mean_std(dff[m].values())[0]
        imp = (dm - base) / base * 100 if base > 0 else math.nan
        p = paired_p(dff[m], values(found, strongest, m))
        info["strongest"][m], info["improvement"][m] = strongest, imp
        imp_cells.append(f"{imp:+.2f}% (p={fmt_p(p)})")
        strong_cells.append(run_name(strongest))
    text += "\n| DFF vs the strongest baseline | " + " | ".join(MAIN_METRICS) + " |\n|---|" + "---|" * len(MAIN_METRICS)
    text += "\n| strongest baseline | " + " | ".join(strong_cells) + " |"
    text += "\n| relative improvement (paired p) | " + " | ".join(imp_cells) + " |\n"
    text += "\nPaired t-test of DFF against each baseline over the seeds both finished (two-sided, "
    text += f"`scipy.stats.ttest_rel`; * = p < {ALPHA}; n/a = fewer than 2 paired seeds; a positive Δ means DFF is better):\n\n"
    text += (
        "| baseline | "
        + " | ".join(f"Δ{m} (p)" for m in MAIN_METRICS)
        + " |\n|---|"
        + "---|" * len(MAIN_METRICS)
        + "\n"
    )
    for r in baselines:
        cells = []
        for m in MAIN_METRICS:
            b = values(found, r, m)
            p = paired_p(dff[m], b)
            info["p"][(r, m)] = p
            delta = mean_std(dff[m].values())[0] - mean_std(b.values())[0]
            cells.append(f"{delta:+.4f} ({fmt_p(p)})")
        text += f"| {run_name(r)} | " + " | ".join(cells) + " |\n"
    return text, info


def set_table(found: dict, kind: str) -> str | None:
    """Tables 3 and 4: DFF on each extra feature set of `kind` against DFF on the hidden set (paired t-tests)."""
    rows = sorted(r for r in found if set_kind(r) == kind)
    if not rows or "dff" not in found:
        return None
    text = table(
        found, ["dff", *rows], label=lambda r: run_name(r, found) + (" — the `hidden` set" if r == "dff" else "")
    )
    text += "\nPaired t-test against DFF on the `hidden` set (two-sided, over the seeds both finished; "
    text += f"* = p < {ALPHA}; a positive Δ means this set is better):\n\n"
    text += (
        "| feature set | " + " | ".join(f"Δ{m} (p)" for m in MAIN_METRICS) + " |\n|---|" + "---|" * len(MAIN_METRICS)
    )
    for r in rows:
        cells = []
        for m in MAIN_METRICS:
            a, b = values(found, r, m), values(found, "dff", m)
            delta = mean_std(a.values())[0] - mean_std(b.values())[0]
            cells.append(f"{delta:+.4f} ({fmt_p(paired_p(a, b))})")
        text += f"\n| `{r.removeprefix('set_')}` | " + " | ".join(cells) + " |"
    return text + "\n"


def cold_tables(found: dict, runs: list[str]) -> str:
    """Per run: metrics by bin of the target item's train interaction count (mean ± std over seeds)."""
    parts = []
    for r in runs:
        if r not in found:
            continue
        bins = bin_order(next(iter(found[r].values()))["test"].get("cold_start", {}))
        if not bins:
            continue
        lines = [f"**{run_name(r)}**\n", "| target's train count | test users | HR@10 | NDCG@10 |", "|---|---|---|---|"]
        for b in bins:
            slices = [res["test"]["cold_start"][b] for res in found[r].values() if b in res["test"]["cold_start"]]
            users = slices[0].get("num_users", 0)
            if not users:
                lines.append(f"| {b} | 0 | – | – |")
                continue
            ms = [mean_std(s[m] for s in slices) for m in KEY_METRICS]
            hr, nd = (fmt(*x) if len(slices) > 1 else f"{x[0]:.4f}" for x in ms)
            lines.append(f"| {b} | {users} | {hr} | {nd} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts) if parts else "_no cold-start slices in the results_\n"


def alpha_summary(found: dict) -> tuple[str, np.ndarray | None]:
    runs = [
        res["analysis"]["layer_weights"]
        for res in found.get("dff", {}).values()
        if res.get("analysis", {}).get("layer_weights")
    ]
    if not runs:
        return "_no DFF run with layer weights_\n", None
    w = np.asarray(runs, np.float64)
    m, s = w.mean(0), (w.std(0, ddof=1) if len(w) > 1 else np.zeros(w.shape[1]))
    top = np.argsort(-m)[:3]
    text = (
        f"DFF's learned layer weights alpha (softmax, Eq. 5), mean ± std over {len(w)} seeds; uniform would be "
        f"{1 / w.shape[1]:.4f}. Largest: " + ", ".join(f"layer {i} ({m[i]:.4f})" for i in top) + ".\n\n"
    )
    text += "| layer | " + " | ".join(str(i) for i in range(w.shape[1])) + " |\n|---|" + "---|" * w.shape[1] + "\n"
    text += "| alpha | " + " | ".join(f"{a:.3f}±{b:.3f}" for a, b in zip(m, s, strict=True)) + " |\n"
    return text, w


def gate_summary(found: dict, runs: list[str]) -> str:
    lines = [
        (
            "Gate g of Eq. 4/6 is the weight on the ID embedding (1 - g on content), averaged over the embedding "
            "dimensions per item; quantiles over items, mean over seeds.\n"
        ),
        "| run | mean g | q05 | q25 | median | q75 | q95 |",
        "|---|---|---|---|---|---|---|",
    ]
    n = 0
    for r in runs:
        an = [res.get("analysis", {}) for res in found.get(r, {}).values()]
        an = [a for a in an if "gate_mean" in a]
        if not an:
            continue
        qs = [np.mean([a["gate_quantiles"][q] for a in an]) for q in ("0.05", "0.25", "0.5", "0.75", "0.95")]
        mean = np.mean([a["gate_mean"] for a in an])
        lines.append(f"| {run_name(r)} | {mean:.3f} | " + " | ".join(f"{q:.3f}" for q in qs) + " |")
        n += 1
    return "\n".join(lines) + "\n" if n else "_no fusion run with gate statistics_\n"


def _verdict(ok: list[bool]) -> str:
    return "**holds**" if all(ok) else ("**partly holds**" if any(ok) else "**does not hold**")


def findings(found: dict, num_layers: int) -> str:
    """The paper's findings checked on the test metrics: a comparison counts only in the paper's direction AND with a
    paired t-test over seeds at p < ALPHA; the right direction without significance is reported as "n.s."."""
    out = []

    def cmp(a, b, metric, better=True):
        x, y = seed_mean(found, a, metric), seed_mean(found, b, metric)
        p = paired_p(values(found, a, metric), values(found, b, metric))
        right = (x > y) if better else (x < y)
        mark = ("✓" if p < ALPHA else "n.s.") if right else "✗"
        return right and p < ALPHA, f"{metric} {x:.4f} vs {y:.4f} (p={fmt_p(p)}) {mark}"

    def check(title, pairs):
        missing = [f"{run_name(a)} vs {run_name(b)}" for a, b, _ in pairs if a not in found or b not in found]
        pairs = [(a, b, better) for a, b, better in pairs if a in found and b in found]
        if not pairs:
            out.append(f"- {title}: not tested (runs missing).")
            return
        if missing:
            title += f" [untested, runs missing: {'; '.join(missing)}]"
        oks, details = [], []
        for a, b, better in pairs:
            for metric in KEY_METRICS:
                ok, d = cmp(a, b, metric, better)
                oks.append(ok)
                details.append(f"{run_name(a)} {'>' if better else '<'} {run_name(b)}: {d}")
        out.append(f"- {title}: {_verdict(oks)} at p < {ALPHA}. " + "; ".join(details) + ".")

    check("Finding 1 (Figure 2) — hidden states beat captions", [("fusion_last", "caption", True)])
    check(
        "Finding 2 (Table 1) — fusion beats replacement, and replacement is worse than ID only",
        [("fusion_last", "replace", True), ("replace", "id", False), ("fusion_last", "id", True)],
    )
    layers = sorted(int(r.split("_")[1]) for r in found if r.startswith("layer_"))
    if len(layers) >= 3:
        third = num_layers / 3
        groups = {
            "shallow": [k for k in layers if k < third],
            "middle": [k for k in layers if third <= k < 2 * third],
            "deep": [k for k in layers if k >= 2 * third],
        }
        oks, details = [], []
        for metric in KEY_METRICS:
            # per seed, the mean test metric of each group's layers: paired over seeds like every other comparison
            per_seed = {n: _group_values(found, ks, metric) for n, ks in groups.items() if ks}
            if len(per_seed) == 3:
                g = {n: mean_std(v.values())[0] for n, v in per_seed.items()}
                tests = [paired_p(per_seed["middle"], per_seed[o]) for o in ("shallow", "deep")]
                right = g["middle"] > g["shallow"] and g["middle"] > g["deep"]
                ok = right and all(p < ALPHA for p in tests)
                oks.append(ok)
                mark = ("✓" if ok else "n.s.") if right else "✗"
                details.append(
                    f"{metric} mean over layers shallow {g['shallow']:.4f} / middle {g['middle']:.4f} / deep "
                    f"{g['deep']:.4f} (middle vs shallow p={fmt_p(tests[0])}, vs deep p={fmt_p(tests[1])}) {mark}"
                )
            best = best_layer(found, metric)  # chosen on validation
            if "fusion_mean" in found and best is not None:
                ok, d = cmp("fusion_mean", best, metric)
                oks.append(ok)
                details.append(f"mean of layers > best single layer ({best.split('_')[1]}, by validation): {d}")
        out.append(
            f"- Finding 3 (Figure 3) — middle layers beat shallow and deep ones (thirds of the {num_layers} stored "
            f"rows), and the uniform mean of layers is at least as good as the best single layer: {_verdict(oks)}. "
            + "; ".join(details)
            + "."
        )
    else:
        out.append("- Finding 3 (Figure 3): not tested (fewer than 3 layers swept).")
    check(
        "DFF (Table 2) — learned layer weights beat the uniform mean, the last layer and ID only",
        [("dff", "fusion_mean", True), ("dff", "fusion_last", True), ("dff", "id", True)],
    )
    return "\n".join(out) + "\n"


def _group_values(found: dict, layers: list[int], metric: str) -> dict[int, float]:
    """Per seed, the mean test `metric` over the runs layer_<k> for k in `layers` (seeds all of them finished)."""
    per_run = [values(found, f"layer_{k}", metric) for k in layers]
    seeds = set.intersection(*(set(v) for v in per_run)) if per_run else set()
    return {s: float(np.mean([v[s] for v in per_run])) for s in sorted(seeds)}


# ------------------------------------------------------------------------------------------------------ report


def write_report(out: Path, runs: list[str], meta: dict, last_layer: int | None = None) -> list[Path]:
    """Writes results.csv, report.md and plots/*.png into `out` from the finished runs among `runs`.

    `last_layer`: the sweep includes the last stored layer, whose run is fusion_last (the same config): the sweep's
    table and plot show fusion_last's results at that layer (results.csv lists them once, as fusion_last).
    """
    out = Path(out)
    points, metric = list(meta.get("grid") or ()), meta.get("select_metric", "NDCG@10")
    seeds = meta.get("seeds")
    found = collect(out, runs, points, metric, seeds)
    order = [r for r in runs if r in found]
    rows = [flat_row(r, s, found[r][s]) for r in order for s in sorted(found[r])]
    if points:  # the selected grid point of each row
        chosen = {
            r: select_points({p: x for p in points if (x := _seeds(out / "runs" / r / p, seeds))}, metric)
            for r in order
        }
        rows = [{"run": row["run"], "grid_point": chosen[row["run"]], **row} for row in rows]
    write_csv(out / "results.csv", rows)
    if last_layer is not None and "fusion_last" in found and f"layer_{last_layer}" not in found:
        found[f"layer_{last_layer}"] = found["fusion_last"]
        order.append(f"layer_{last_layer}")
    layer_runs = sorted((r for r in order if r.startswith("layer_")), key=lambda r: int(r.split("_")[1]))
    alpha_text, weights = alpha_summary(found)
    layers = [int(r.split("_")[1]) for r in layer_runs]
    sweep = {m: tuple(np.array([seed_stats(found, r, m) for r in layer_runs]).T) for m in KEY_METRICS}
    lines = {
        r: {m: seed_stats(found, r, m)[0] for m in KEY_METRICS}
        for r in found
        if r in ("fusion_mean", "dff", "fusion_last", "id")
    }
    plot_paths = plots.write_plots(out / "plots", found, layers, sweep, lines, weights)

    any_res = next(iter(next(iter(found.values())).values()))
    ds, cfg = any_res.get("dataset", {}), any_res.get("config", {})
    md = [f"# DFF study: {meta.get('config')}\n"]
    md.append(f"Command: `{meta.get('command')}`\n")
    md.append(
        f"{len(rows)} finished runs ({len({r['run'] for r in rows})} rows x up to {meta.get('seeds')} seeds, "
        f"config.seed {meta.get('base_seed')} + seed index). Test metrics by full ranking (HR/NDCG@K) of the best "
        "validation checkpoint; mean ± std (sample std) over seeds. Features: "
        + ", ".join(f"{k} = `{v}`" for k, v in meta.get("features", {}).items())
        + f" ({meta.get('num_layers')} stored layers in the hidden-state set). Overrides: {meta.get('sets') or 'none'}.\n"
    )
    if ds:
        md.append(
            "Dataset: "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in ds.items()
                if isinstance(v, int | float)
            )
            + ".\n"
        )
    identical = {
        r: max(res.get("features", {}).get("identical_items", 0) for res in found[r].values())
        for r in order
        if any(res.get("features") for res in found[r].values())
    }
    if identical:
        tied = ", ".join(f"{run_name(r)} {n}" for r, n in identical.items() if n)
        md.append(
            "Items whose features are exactly those of another item (they tie in every content score): "
            + (tied if tied else "none in any feature set")
            + ".\n"
        )
    if cfg:
        m, t, lo, o = cfg.get("model", {}), cfg.get("train", {}), cfg.get("loss", {}), cfg.get("optim", {})
        md.append(
            f"Model: embed_dim {m.get('embed_dim')}, {m.get('num_blocks')} blocks, dropout {m.get('dropout')}, "
            f"max_seq_len {m.get('max_seq_len')}, loss {lo.get('name')}, lr {o.get('lr')}, batch "
            f"{t.get('batch_size')}, at most {t.get('num_epochs')} epochs, patience {t.get('patience')} on "
            f"valid {t.get('select_metric')}.\n"
        )
    if points:
        md.append(f"## Grid selection — valid {metric} per grid point (mean over the finished seeds, their count)\n")
        md.append(
            f"Every row was trained at each point of `--grid` ({len(points)} points); the point with the best mean "
            f"validation {metric} is kept per row (bold), and every table below shows that point's test metrics.\n"
        )
        md.append(grid_table(out, order, points, metric, seeds))
    md.append("## Table 1 — ID vs replacement vs fusion\n")
    md.append(table(found, ["id", "replace", "fusion_last"]))
    if "caption" in found:
        md.append("\n## Figure 2 — caption-centric (CC) vs hidden-state-centric (HC)\n")
        md.append(table(found, ["caption", "fusion_last", "fusion_mean", "dff"], label=lambda r: run_name(r, found)))
    if layer_runs:
        md.append("\n## Figure 3 — layer sweep (fusion with one stored layer)\n")
        extra = [r for r in ("fusion_mean", "dff", "fusion_mean_raw", "dff_raw") if r in found]
        md.append(table(found, layer_runs + extra, KEY_METRICS, label=lambda r: run_name(r, found)))
        if (out / "plots" / "layers.png").is_file():
            md.append("\n![layers](plots/layers.png)\n")
    for kind, title in (
        ("prompt", "Table 3 — prompt (recommendation prompt = the `hidden` set)"),
        ("modality", "Table 4 — input modality"),
        ("other", "Other feature sets"),
    ):
        section = set_table(found, kind)
        if section:
            md.append(f"\n## {title}\n")
            md.append(section)
    md.append("\n## Table 2 — main comparison\n")
    main_text, _ = main_table(found)
    md.append(main_text)
    md.append("\n## Cold start — metrics by the target item's train interaction count\n")
    md.append(cold_tables(found, [r for r in order if not r.startswith(("layer_", "set_"))]))
    md.append("\n## DFF layer weights and gate\n")
    md.append(alpha_text)
    md.append("\n" + gate_summary(found, order))
    images = [
        f"![{n}](plots/{n}.png)" for n in ("alpha", "gate", "gate_epochs") if (out / "plots" / f"{n}.png").is_file()
    ]
    if images:
        md.append("\n" + " ".join(images) + "\n")
    md.append("\n## Findings\n")
    md.append(findings(found, int(meta.get("num_layers") or 0)))
    report = out / "report.md"
    _write_text(report, "\n".join(md))
    return [out / "results.csv", report, *plot_paths]
