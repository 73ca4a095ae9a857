"""The report's setup section: the environment of the rows used, the budget and stage times of `bench run`."""
from __future__ import annotations

import pandas as pd

from bench.report.common import Context, Selection, fmt, markdown

PROVENANCE = ["device_name", "threads", "torch", "cuda", "precision", "commit", "host_os"]


def environment_table(sel: Selection) -> pd.DataFrame:
    sources = [("speed (timed)", sel.timed), ("speed (FLOPs only)", sel.flops), ("quality", sel.quality)]
    lines = []
    for label, df in sources:
        if df.empty:
            continue
        line = {"rows": f"{label}: {len(df)}"}
        for col in PROVENANCE:
            values = [str(v) for v in dict.fromkeys(df[col].dropna().tolist())]
            line[col.replace("_", " ")] = ", ".join(values) or "-"
        lines.append(line)
    return pd.DataFrame(lines)


def status(stage: str, record: dict) -> str:
    """A stage's status as the report tells it; the report stage is running while it writes this report."""
    if stage == "report" and record.get("status") == "running":
        return "writing this report"
    return str(record.get("status", "-"))


def budget_tables(state: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    budget = state.get("budget", {})
    explained = state.get("budget_help", {})
    def shown(v) -> str:
        if v is None:
            return "trainer's preset default"
        return ", ".join(map(str, v)) if isinstance(v, list) else str(v)

    b = pd.DataFrame([{"setting": k, "value": shown(v), "what it is": explained.get(k, "")}
                      for k, v in budget.items() if k != "note"])
    stages = pd.DataFrame([{"stage": name, "status": status(name, s), "seconds": fmt(s.get("seconds")),
                            "finished": s.get("finished", "-")} for name, s in state.get("stages", {}).items()])
    return b, stages



def section(ctx: Context) -> list[str]:
    md = ["## Setup", ""]
    env = environment_table(ctx.sel)
    if not env.empty:
        md += ["Environment, from the provenance columns of the rows used:", "", markdown(env), ""]
    if ctx.state:
        budget, stages = budget_tables(ctx.state)
        md += [f"Budget of `bench run --preset {ctx.sel.preset}` (one table in `bench/pipeline.py`):", "",
               markdown(budget), "", "Stages and the time each took (wall clock):", "", markdown(stages), ""]
    return md
