"""The evaluation report: what a run counted and measured, and how it is shown.

    metrics.py    exact top-k counts in integers, per-class accuracy
    profile.py    the stage breakdown, capacities and verdict
    output.py     the console table, progress line, JSON report, environment
    trace.py      the Chrome/Perfetto trace file (--trace)
    agreement.py  top-1 agreement between two preprocessing modes (fast vs exact)
    labelsets.py  ReaL, ImageNet-A/R class subsets, V2 numbered folders, --class-map, timm's figures
    stats.py      Wilson intervals, NLL, ECE, confused pairs, McNemar's exact test
    analysis.py   run-eval's hooks into the above, per batch in the reduce step
    perimage.py   per-image rows (--per-image) and reading them (and run-score's) back
    compare.py    bin/compare-runs: two runs over the same images, image by image
"""
