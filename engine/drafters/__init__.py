"""Drafters propose token trees; the target verifies them (engine/verify.py).

The engine talks to a drafter only through ``Drafter``'s methods, keyed by
request id and carrying plain lists and CPU tensors, so the same drafter runs
in-process or inside a Ray actor (actors/drafter.py) unchanged.

The package imports no torch by itself: engine/config.py reads the drafter kinds from
engine/drafters/registry.py.
"""

__all__ = ["Drafter", "DraftTree"]


def __getattr__(name: str):
    if name in __all__:
        from engine.drafters import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
