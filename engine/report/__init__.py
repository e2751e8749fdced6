"""The evaluation report: what a run counted and measured, and how it is shown.

    metrics.py    exact top-k counts in integers, per-class accuracy
    profile.py    the stage breakdown, capacities and verdict
    output.py     the console table, progress line, JSON report, environment
    trace.py      the Chrome/Perfetto trace file (--trace)
    agreement.py  top-1 agreement between two preprocessing modes (fast vs exact)
"""
