"""Deprecated alias of :mod:`cgmq_jax.runs.parallel` (the run harness is :mod:`cgmq_jax.runs`).

``import cgmq_jax.parallel`` gives the very module object ``cgmq_jax.runs.parallel``, so
attributes set through either name (``monkeypatch.setattr``) are seen through both.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("cgmq_jax.runs.parallel")
