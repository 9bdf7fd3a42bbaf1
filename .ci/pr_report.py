"""The pull-request comment: what a change did to the model, against the base branch.

    python .ci/pr_report.py --base origin/main --out pr-report.md --plots-dir pr-plots

Params and metrics come from `dvc params diff` / `dvc metrics diff` (markdown tables); plots
from `dvc plots diff`: the plots whose data changed are listed, and all of them are rendered,
base and head side by side, into --plots-dir/index.html (the workflow uploads it).
Run it in the PR's checkout after `dvc repro`, so the workspace holds the head's results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- model-report -->"  # lets the workflow edit its own earlier comment


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: dvc {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def table_or(args: tuple[str, ...], base: str, nothing: str) -> str:
    """The markdown table of `dvc <args> diff <base>`, or `nothing` when it has no rows."""
    if not json.loads(dvc(*args, "diff", base, "--json") or "{}"):
        return nothing
    return dvc(*args, "diff", base, "--md").strip()


def changed_plots(base: str) -> list[str]:
    """Plots whose data differ between `base` and the workspace (per `dvc plots diff --json`)."""
    rendered = json.loads(dvc("plots", "diff", base, "--json"))["data"]
    changed = []
    for name, renders in rendered.items():
        rows = [row for render in renders for row in render.get("content", {}).get("data", {}).get("values", [])]
        by_rev = {rev: sorted(json.dumps({k: v for k, v in row.items() if k != "rev"}, sort_keys=True)
                              for row in rows if row.get("rev") == rev) for rev in ("workspace", base)}
        if by_rev["workspace"] != by_rev[base]:
            changed.append(name)
    return sorted(changed)


def report(base: str, plots_dir: Path) -> str:
    dvc("plots", "diff", base, "--out", str(plots_dir))
    changed = changed_plots(base)
    plots = ("\n".join(f"- `{name}`" for name in changed) if changed else "No plot changed.")
    return (f"{MARKER}\n## What this change does to the model (vs `{base}`)\n\n"
            f"### Params\n\n{table_or(('params',), base, 'No parameter changed.')}\n\n"
            f"### Metrics\n\n{table_or(('metrics',), base, 'No metric changed.')}\n\n"
            f"### Plots\n\n{plots}\n\nAll plots, `{base}` and this change overlaid: `{plots_dir.name}/index.html` "
            "(the workflow's `plots` artifact).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare with, e.g. origin/main")
    parser.add_argument("--out", default="pr-report.md")
    parser.add_argument("--plots-dir", default="pr-plots")
    args = parser.parse_args()
    text = report(args.base, Path(args.plots_dir))
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
