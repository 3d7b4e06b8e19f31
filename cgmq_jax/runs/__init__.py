"""The run harness: fit and its protocol, run directories, checkpoints, reports, sweeps.

Everything here sits on top of the library core (``quantizer``, ``nn``/``nnx``, ``graph``,
``cost``, ``constraint``, ``certify``, ``export``); nothing in the core imports this package.
"""
