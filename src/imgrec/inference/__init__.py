"""Inference: a model directory behind one call, on the backend that runs it fastest.

``backends/`` holds one module per way of running the network (PyTorch eager, channels_last,
bf16, torch.compile, onnxruntime fp32 and int8), each saying how it is built and, where it runs
from a file, how that file is exported; ``choice.py`` picks the backend ``imgrec benchmark``
found fastest; ``predict.py`` is ``imgrec.load(RUN).predict``; ``export.py`` and
``benchmark.py`` are the commands of the same names. Nothing here imports the training engine.
"""
