"""Reporting: evaluation JSONs -> records -> the comparison table, its Markdown and the report figures.

- `records.py`: one long table of every measured number (subject, variant, objective, benchmark, metric,
  seed, value).
- `table.py`: the objective x variant table with its differences; every expected cell accounted for.
- `markdown.py`: the table as the report and the terminal show it.
- `plots.py`: the report's figures and the check's histogram.

No Kedro here (pandas, numpy, matplotlib only), so the report can be rebuilt from saved JSONs, from a
notebook, or from MLflow (``warmup_distill_kedro.compare``) without a session.
"""
