"""``scaling.report --predict 8,16,64``: the predictor's table and figure added to a study report.

Runs ``scaling.predict`` on the report's study folders (the link fitted on their own bucket
timelines, or ``--predict-link``), writes prediction.json and prediction.png into the report
folder, and appends a "Prediction" section to report.md and report.html.
"""

from __future__ import annotations

import html
from pathlib import Path

from scaling.predict.report import PredictOptions, Result, parse_latency_s, parse_rate_bit_s, run_prediction


def add_prediction(study_dirs: list[Path], out_dir: Path, nprocs: list[int], link: str | None = None) -> Result:
    rate_bit_s = latency_s = None
    if link is not None:
        rate, _, latency = link.partition(",")
        rate_bit_s = parse_rate_bit_s(rate)
        latency_s = parse_latency_s(latency) if latency else None
    result = run_prediction(PredictOptions(runs=list(study_dirs), nprocs=nprocs, link_bit_s=rate_bit_s,
                                           link_latency_s=latency_s, link_given=link is not None, out=out_dir))
    table = result.text.split("\n\n  written:")[0]
    md = out_dir / "report.md"
    if md.exists():
        md.write_text(md.read_text().rstrip("\n") + "\n\n## Prediction\n\n```\n" + table
                      + "\n```\n\n![prediction](prediction.png)\n")
    page = out_dir / "report.html"
    if page.exists():
        section = (f"<h2>Prediction</h2><pre>{html.escape(table)}</pre>"
                   f"<img src=\"prediction.png\" alt=\"prediction\">")
        text = page.read_text()
        page.write_text(text.replace("</body>", section + "</body>") if "</body>" in text else text + section)
    return result
