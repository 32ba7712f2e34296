"""The acceptance table and markdown of ``benchmarks/diffusion.py``: every student's
figures as the mean and spread over its seeds (stages ``<name>``, ``<name>_s<seed>``),
ratios to the teacher's best FID, speed-ups against the teacher at a fixed 20 steps."""

from __future__ import annotations

import json
import statistics

REFERENCE_STEPS = 20  # the speed-ups' teacher: fixed, not its best
NEW_STUDENTS = ("dmd", "scm", "tbcm", "segmented")  # the one-step issue's: 40 minutes each
TRAINING_LIMIT_S = 40 * 60


def seed_names(name: str, seeds) -> list[str]:
    return [name if s == 0 else f"{name}_s{s}" for s in seeds]


def per_seed(m: dict, name: str, seeds, metric: str, steps: int) -> list[float] | None:
    """The metric of every seed of ``name`` that was evaluated (None: none was)."""
    keys = [f"{metric}/{n}/{steps}" for n in seed_names(name, seeds)]
    return [m[k] for k in keys if k in m] or None


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def ratios(m: dict, name: str, seeds, steps: int) -> dict | None:
    fids = per_seed(m, name, seeds, "fid", steps)
    return None if fids is None else summary([f / m["fid/teacher/best"] for f in fids])


def _fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ({s['min']:.3f} to {s['max']:.3f}, {s['n']} seeds)"


def row(check: str, s: dict | None, target: str, ok) -> dict:
    if s is None:
        return {"check": check, "value": None, "shown": "not run", "target": target, "ok": False}
    return {"check": check, "value": s["mean"], "shown": _fmt(s), "target": target,
            "ok": bool(ok(s["mean"]))}


def acceptance(m: dict, identical: bool, students, seeds,
               seconds: dict | None = None) -> list[dict]:
    t_fid, t_acc = m["fid/teacher/best"], m["class_accuracy/teacher/best"]
    best = int(m["steps/teacher/best"])
    t_recall = m[f"recall/teacher/{best}"]
    at = {n: {s: ratios(m, n, seeds, s) for s in (1, 2, 4)} for n in students}
    one = [n for n in students if at[n][1]]
    four = [n for n in students if at[n][4]]
    best1 = min(one, key=lambda n: at[n][1]["mean"])
    best4 = min(four, key=lambda n: at[n][4]["mean"])
    acc1 = summary([a / t_acc for a in per_seed(m, best1, seeds, "class_accuracy", 1)])
    speed1 = summary([m[f"ms_per_image/teacher/{best}"] / v
                      for v in per_seed(m, best1, seeds, "ms_per_image", 1)])
    rows = [
        {"check": "teacher FID at its best step count / real-vs-real floor",
         "value": t_fid / m["fid/real/floor"], "shown": f"{t_fid / m['fid/real/floor']:.3f}",
         "target": "<= 3", "ok": t_fid <= 3 * m["fid/real/floor"]},
        {"check": "teacher class accuracy at its best step count", "value": t_acc,
         "shown": f"{t_acc:.3f}", "target": ">= 0.95", "ok": t_acc >= 0.95},
        row(f"best 1-step student ({best1}) FID / teacher best FID", at[best1][1], "<= 3",
            lambda v: v <= 3),
        row(f"best 1-step student ({best1}) class accuracy / teacher's", acc1, ">= 0.9",
            lambda v: v >= 0.9),
        row(f"best 4-step student ({best4}) FID / teacher best FID", at[best4][4], "<= 1.5",
            lambda v: v <= 1.5),
        row(f"speed-up of the 1-step {best1} student over the teacher at its best steps",
            speed1, ">= 20", lambda v: v >= 20),
    ]
    if "dmd" in students:
        acc = per_seed(m, "dmd", seeds, "class_accuracy", 1)
        rec = per_seed(m, "dmd", seeds, "recall", 1)
        rows += [
            row("DMD2, 1 step: FID / teacher best FID", at["dmd"][1], "<= 1.3",
                lambda v: v <= 1.3),
            row("DMD2, 1 step: class accuracy / teacher's",
                acc and summary([a / t_acc for a in acc]), ">= 0.95", lambda v: v >= 0.95),
            row(f"DMD2, 1 step: recall / teacher's at its best ({t_recall:.3f})",
                rec and summary([r / max(t_recall, 1e-9) for r in rec]), ">= 0.8",
                lambda v: v >= 0.8)]
    cms = [n for n in ("scm", "tbcm") if n in students and at[n][1]]
    if cms:
        better = min(cms, key=lambda n: at[n][1]["mean"])
        rows += [row(f"better of sCM and TBCM ({better}), 1 step: FID / teacher best FID",
                     at[better][1], "<= 1.6", lambda v: v <= 1.6),
                 row(f"better of sCM and TBCM ({better}), 2 steps: FID / teacher best FID",
                     at[better][2], "<= 1.2", lambda v: v <= 1.2)]
    if "segmented" in students:
        rows.append(row("segmented consistency (Hyper-SD), 4 steps: FID / teacher best FID",
                        at["segmented"][4], "<= 1.2", lambda v: v <= 1.2))
    new = {n for b in NEW_STUDENTS if b in students for n in seed_names(b, seeds)}
    timed = {n: s for n, s in (seconds or {}).items() if n in new}
    if timed:
        slowest = max(timed, key=timed.get)
        rows.append({"check": f"longest training of a new student ({slowest}), seconds",
                     "value": timed[slowest], "shown": f"{timed[slowest]:.0f}",
                     "target": f"<= {TRAINING_LIMIT_S}",
                     "ok": timed[slowest] <= TRAINING_LIMIT_S})
    rows.append({"check": "trajectories from 2 actors identical to 1 actor (first 200 rows)",
                 "value": float(identical), "shown": str(bool(identical)),
                 "target": "1 (identical)", "ok": identical})
    return rows


def quality_table(m: dict, students, seeds) -> list[str]:
    """Teacher rows, then each student at each step count it ran: mean (spread) over seeds."""
    lines = ["| model | steps | FID / teacher best | FID | precision | recall | class acc. | "
             f"ms/image | speed-up vs teacher at {REFERENCE_STEPS} steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    t_steps = sorted(int(k.split("/")[2]) for k in m
                     if k.startswith("fid/teacher/") and k.split("/")[2].isdigit())
    ref = m.get(f"ms_per_image/teacher/{REFERENCE_STEPS}")
    for s in t_steps:
        k = f"teacher/{s}"
        lines.append(f"| teacher | {s} | {m[f'fid/{k}'] / m['fid/teacher/best']:.2f} | "
                     f"{m[f'fid/{k}']:.2f} | {m[f'precision/{k}']:.3f} | "
                     f"{m[f'recall/{k}']:.3f} | {m[f'class_accuracy/{k}']:.3f} | "
                     f"{m[f'ms_per_image/{k}']:.3f} | "
                     f"{ref / m[f'ms_per_image/{k}'] if ref else float('nan'):.1f}x |")
    for n in students:
        for s in (1, 2, 4):
            r = ratios(m, n, seeds, s)
            if r is None:
                continue
            mean = {metric: statistics.fmean(per_seed(m, n, seeds, metric, s))
                    for metric in ("fid", "precision", "recall", "class_accuracy",
                                   "ms_per_image")}
            lines.append(f"| {n} | {s} | {_fmt(r)} | {mean['fid']:.2f} | "
                         f"{mean['precision']:.3f} | {mean['recall']:.3f} | "
                         f"{mean['class_accuracy']:.3f} | {mean['ms_per_image']:.3f} | "
                         f"{ref / mean['ms_per_image'] if ref else float('nan'):.1f}x |")
    return lines


def write_markdown(result: dict, metrics: dict, path: str, students, seeds) -> None:
    lines = ["# Diffusion timestep distillation on scikit-learn digits", "",
             f"Profile `{result['profile']}`; machine: {result['machine_line']}; commit "
             f"{result.get('commit')}.",
             f"Command: `{result['command']}`. Stage times (s): "
             + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items()) + "."
             + (f" Reused from an earlier invocation (same configs, inputs and seeds): "
                f"{', '.join(result['reused_from_earlier_invocation'])}."
                if result["reused_from_earlier_invocation"] else ""), "",
             f"Every student trained with {len(seeds)} seeds ({list(seeds)}); its figures "
             "are the mean over them, (min to max) in brackets.", "",
             f"Real-vs-real FID floor (classifier features, {result['num_samples']} samples): "
             f"{metrics['fid/real/floor']:.2f}; teacher best at "
             f"{int(metrics['steps/teacher/best'])} steps (FID {metrics['fid/teacher/best']:.2f})."
             f" Teacher: {json.dumps(result['teacher'])}.", "",
             "## Acceptance", "", "| check | measured | target | ok |", "|---|---|---|---|"]
    for r in result["acceptance"]:
        lines.append(f"| {r['check']} | {r['shown']} | {r['target']} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Quality against steps", ""] + quality_table(metrics, students, seeds)
    lines += ["", "Plots: [FID vs steps](diffusion_fid_vs_steps.png), sample grids "
              + ", ".join(f"[{n}](diffusion_samples_{n}.png)" for n in ("teacher", *students))
              + ".", "", "Overrides of the example's configs: `"
              + json.dumps(result["overrides"]) + "`."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
