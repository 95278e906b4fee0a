"""RULER (Hsieh et al. 2024, arXiv 2404.06654) offline: the 13 tasks' generators, RULER's scoring, the runner
and the report section (docs/eval.md#ruler).

- tasks.py: the task table, RULER's prompt templates and answer prefixes, string_match_all / _part;
- needles.py, aggregate.py, qa.py: the generators (niah + vt; cwe + fwe; qa_1 + qa_2);
- samples.py: one sample sized to a length; fit.py: the sizing search; words.py: random keys and word pools;
- run.py: `ruler_at_lengths` (through the passkey runner); report.py: tables, heatmap, terminal table.

Nothing imported here at package level: the recipe schema reads tasks.py without pulling in torch.
"""
