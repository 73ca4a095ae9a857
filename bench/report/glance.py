"""The report's "At a glance": three verdicts a reader takes in first (mask, speed, training), then the headline
figures of the sections below. Every figure is one the sections print, from the same rows."""
from __future__ import annotations

from typing import Optional

from bench import plots
from bench.report.common import Context, fmt
from bench.report.estimates import fmt_estimate, nfe_ratio, paired, parser_of, verdict
from bench.report.paper import speed_ratio_sentence
from bench.report.quality import REFERENCE, main_parser, parser_labels, versus
from bench.report.settle import Reach, fmt_cost, on_common_masks, verdict_line

name = plots.display_name


def mask_verdict(ctx: Context) -> Optional[str]:
    """Which model follows the mask best, and by how much over the runner-up (paired difference)."""
    parser = main_parser(ctx.final)  # the models one parser scored: others' mIoU is not comparable
    means = {m: s.figures["miou"].value for m, s in ctx.final.items()
             if "miou" in s.figures and parser_of(s) == parser}
    if len(means) < 2:
        return None
    best, second = sorted(means, key=means.get, reverse=True)[:2]
    a, b = on_common_masks(ctx.final[best], ctx.final[second])
    d = paired(a, b).get("miou")
    by = f"{verdict(d)} mIoU over the runner-up, {name(second)} (paired)" if d is not None else \
        f"runner-up {name(second)} at {fmt_estimate(ctx.final[second].figures['miou'])}"
    step = ctx.final[best].step
    return (f"**Follows the mask best: {name(best)}**, mask mIoU {fmt_estimate(ctx.final[best].figures['miou'])} "
            f"at step {step}; {by}.")


def speed_verdict(ctx: Context) -> Optional[str]:
    """Which model is fastest per image, and the reproducible per-NFE ratio of the next one to it."""
    speed = ctx.speed
    if speed is None or len(speed.latency) < 2:
        return None
    lat = speed.latency.sort_values("latency_s")
    fastest, nxt = lat.iloc[0], lat.iloc[1]
    ratio = nfe_ratio(speed, nxt["model"], fastest["model"])
    how = (f"{name(nxt['model'])} takes {ratio.text()} times as long per network evaluation ({ratio.how()})"
           if ratio is not None else f"next: {name(nxt['model'])} at {fmt(nxt['latency_s'])} s")
    projected = " (projected)" if fastest["projected"] else ""
    return (f"**Fastest per image: {name(fastest['model'])}**, {fmt(fastest['latency_s'])} s{projected} per image "
            f"at {speed.steps} steps, batch 1, {speed.device}; {how}.")


def training_verdict(ctx: Context) -> Optional[str]:
    """Which model reaches the highest mIoU target that two or more models reach with the least training time."""
    reached: dict[float, dict[str, Reach]] = {}
    for model, per_target in ctx.reaches.items():
        for r in per_target:
            if r.reached:
                reached.setdefault(r.target, {})[model] = r
    shared = [t for t, models in reached.items() if len(models) >= 2]
    if not shared:
        only = [f"{name(m)} ({t:g})" for t, models in reached.items() for m in models]
        return (f"**Least training to a quality target**: no mIoU target is reached by two models or more"
                f"{'; reached: ' + ', '.join(only) if only else ''}.") if ctx.reaches else None
    target = max(shared)
    runs = reached[target]

    def cost(r: Reach) -> float:
        e = r.summary(r.seconds)
        return e.value if e is not None else float("inf")

    order = sorted(runs, key=lambda m: cost(runs[m]))
    best, second = runs[order[0]], runs[order[1]]
    bound = "at most " if best.bounded else ""
    return (f"**Least training to mask mIoU {target:g}: {name(order[0])}**, {bound}"
            f"{fmt_cost(best.summary(best.seconds))} s of {ctx.reach_time} "
            f"({fmt_cost(best.summary(best.steps))} steps); next {name(order[1])}, "
            f"{fmt_cost(second.summary(second.seconds))} s ({fmt_cost(second.summary(second.steps))} steps). "
            f"Mean over seeds, 95% t interval (see Time to quality).")


def at_a_glance(ctx: Context) -> list[str]:
    """The three verdicts, whether the ranking is settled, then the headline figures."""
    lines = [f"- {v}" for v in (mask_verdict(ctx), speed_verdict(ctx), training_verdict(ctx)) if v]
    if ctx.settling is not None and ctx.settling.pairs:
        lines.append(f"- Ranking by mask mIoU: {verdict_line(ctx.settling, name)}")
    lines += figures(ctx)
    return ["## At a glance", "", *lines, ""] if lines else []


def figures(ctx: Context) -> list[str]:
    """Per-model headline figures: time per NFE, mIoU, the parser's ceiling, differences from SISMA."""
    lines, speed = [], ctx.speed
    if speed is not None and not speed.latency.empty:
        parts = [f"{name(r.model)} {fmt(r.nfe_s * 1e3)} ms" for r in speed.latency.itertuples()]
        lines.append(f"- Time per network evaluation (median, batch 1, {speed.device}): {', '.join(parts)}.")
        lines.append(f"- {speed_ratio_sentence(speed)}")
    final = ctx.final
    if final:
        labels = parser_labels(final)
        parts = [f"{name(m)} {fmt_estimate(s.figures.get('miou'))}{f' ({labels[parser_of(s)]})' if labels else ''}"
                 for m, s in final.items()]
        lines.append(f"- Mask mIoU of generated images (mean over seeds, 95% interval"
                     f"{'; parser in brackets' if labels else ''}): {', '.join(parts)}.")
        ceilings = {labels.get(parser_of(s), ""): s.figures["miou_ceiling"] for s in final.values()
                    if "miou_ceiling" in s.figures}
        if ceilings:
            text = ", ".join(f"{f'parser {label} ' if label else ''}{fmt_estimate(e)}" for label, e in ceilings.items())
            lines.append(f"- The parser on the real test images (the ceiling): {text}.")
        if REFERENCE in final:
            diffs = [f"{name(m)} {verdict(d.get('miou'))}" for m in final
                     if m != REFERENCE and (d := versus(ctx, final, m, REFERENCE))]
            if diffs:
                own = " against SISMA's runs scored by its own parser" if labels else ""
                lines.append(f"- mIoU minus SISMA's (paired{own}): {'; '.join(diffs)}.")
    return lines
