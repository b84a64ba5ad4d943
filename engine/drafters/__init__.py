"""Drafters propose token trees; the target verifies them (engine/verify.py).

The engine talks to a drafter only through ``Drafter``'s methods, keyed by
request id and carrying plain lists and CPU tensors, so the same drafter runs
in-process or inside a Ray actor (actors/drafter.py) unchanged.
"""
from engine.drafters.base import Drafter, DraftTree

__all__ = ["Drafter", "DraftTree"]
