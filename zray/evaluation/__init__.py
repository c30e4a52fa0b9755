"""How trained models are measured, apart from how they are trained.

    rewards.py           reward models on the Shapes test pairs: HPA, Margin HPA, PLCC, SRCC, tables, plots
    captions.py          base VLMs: greedy descriptions scored attribute by attribute against the true scenes
    generator.py         generators: the independent judge's verdicts and a Frechet distance to renders
    generator_report.py  the base generator's pictures and summary
"""
