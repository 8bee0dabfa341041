"""The run's report.html: one self-contained page (page.py, with public helpers for other pages) and its
figures made with matplotlib's object API (plots.py, quant_plots.py).

May import: errors, tasks, runs, evaluation.
"""
