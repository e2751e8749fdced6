"""Models: building them, their compiled artifacts, and TorchScript export.

    zoo.py            torchvision models and weights, TorchScript files, the uint8 input adapter
    compile_cache.py  the on-disk cache of compiled models (--cache-dir)
    export.py         `export`: a state dict to TorchScript, checked against eager
"""
