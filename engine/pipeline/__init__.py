"""The pipeline: from image files to filled batches on the device.

    dataset.py    the index (ImageFolder, flat dir + labels, file lists, shards)
    ring.py       the shared-memory ring of batch slots (NOTE [Ring slot ownership and shutdown])
    pool.py       the decode workers that fill ring slots
    pixelcache.py the exact pixel cache: the uint8 crops of earlier runs in one mapped file per key
    sources.py    where the scheduler's batches come from: PoolSource (the decode pool),
                  CacheSource (the pixel cache, the pool writing through it for what it lacks)
    scheduler.py  the asyncio loop: filled slot -> H2D copy -> model -> logits, overlapped
    autotune.py   --workers / --batch-size auto
"""
