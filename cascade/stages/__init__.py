"""The two networks and how each trains (light: nothing here imports torch, so ``cascade --help`` reads it)."""

GATES = ("auto", "shared", "separate")
"""``network.gate`` of a classifier run (``--gate``): ``shared`` (:mod:`cascade.stages.gate`: a head on the
``--init-from`` segmenter's frozen encoder), ``separate`` (a timm classifier with its own backbone) or ``auto``
(shared when ``--init-from`` names a segmenter run, else separate)."""


def is_shared_gate(config: dict) -> bool:
    """Whether a classifier ``config.json`` (or a run's network section) describes a shared-encoder gate."""
    return config.get("gate") == "shared"
