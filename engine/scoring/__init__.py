"""Bulk scoring (`run-score`): top-k predictions for many images into files, exactly once.

    manifest.py   the frozen, hashed list of images and its parts; shards
    job.py        options, the output's fingerprint, PartScorer (parts through the pipeline)
    writer.py     part files (parquet/jsonl/csv), atomic commits, disk-full handling
    run.py        the command: resume, shard, summary, exit statuses
    ray_runner.py the same PartScorer in Ray actors
"""
