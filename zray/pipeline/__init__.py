"""The pipeline's bookkeeping (`zray run`, jobs/run.py): which stages there are, what each depends on, whether a
stage's recorded output can be reused, and the run's Markdown report. No Ray, no torch.

    plan.py    the stage graph, config fingerprints, stage records (written atomically) and the skip/resume decision
    report.py  the run's report.md from the stages' own outputs (tables, plots, wall times)
"""
