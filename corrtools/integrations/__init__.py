"""corrtools.integrations: thin adapters of the Recorder and the Sparsifier to training frameworks.

``corrtools.integrations.lightning`` (needs the ``lightning`` extra) and ``corrtools.integrations.hf``
(needs the ``hf`` extra: transformers, accelerate) each define a ``RecorderCallback`` and a
``SparsifierCallback``. Each framework is imported only by its own module, so importing
``corrtools`` or this package never imports a framework.
"""
from __future__ import annotations

__all__: list[str] = []
