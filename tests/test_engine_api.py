"""The serving app reaches its engine only through the engine's front door (ENGINE_API).

app/ steps an engine "driver": an in-process LLMEngine or the Ray Replica. Every attribute it
reads or calls on the driver must be in ENGINE_API, so the engine's scheduler, allocator,
executor and drafter can change without touching app/. Checked on app/'s source (AST).
"""
from __future__ import annotations

import ast
import os

from actors.replica import Replica
from engine.engine import ENGINE_API, LLMEngine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _chain(node: ast.AST) -> list[str]:
    """self.loop.driver.step -> ["self", "loop", "driver", "step"] (names only; [] for anything else)."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
        return names[::-1]
    return []


def engine_uses(source: str, config_module: bool = False) -> list[tuple[int, str]]:
    """(line, use) for each attribute of a driver outside ENGINE_API, and each handle on an engine
    object (``x.engine`` other than the config's ``cfg.engine``; in app/config.py, AppConfig's own
    ``self.engine`` is that config too)."""
    bad = set()
    for node in ast.walk(ast.parse(source)):
        chain = _chain(node) if isinstance(node, ast.Attribute) else []
        for i, name in enumerate(chain[:-1]):
            if name == "driver" and chain[i + 1] not in ENGINE_API:
                bad.add((node.lineno, ".".join(chain[: i + 2])))
            if chain[i + 1] == "engine" and name != "cfg" and not (config_module and name == "self"):
                bad.add((node.lineno, ".".join(chain[: i + 2])))
    return sorted(bad)


def test_app_uses_only_the_engine_front_door():
    folder = os.path.join(ROOT, "app")
    bad = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                uses = engine_uses(f.read(), config_module=name == "config.py")
            bad += [f"app/{name}:{line}: {what}" for line, what in uses]
    assert not bad, "app/ reaches past ENGINE_API:\n" + "\n".join(bad)


def test_the_check_catches_internals():
    source = ("def f(self, cfg):\n"
              "    self.driver.step()\n"
              "    self.driver.scheduler.running\n"
              "    self.loop.driver._lock\n"
              "    self.engine.allocator\n"
              "    cfg.engine.max_model_len\n")
    assert engine_uses(source) == [(3, "self.driver.scheduler"), (4, "self.loop.driver._lock"), (5, "self.engine")]


def test_both_drivers_offer_the_whole_front_door():
    for cls in (LLMEngine, Replica):
        missing = {name for name in ENGINE_API if not hasattr(cls, name)}
        # last_step and tokenizer are instance attributes of LLMEngine, set in __init__
        if cls is LLMEngine:
            missing -= {"last_step", "tokenizer"}
        assert not missing, f"{cls.__name__} lacks {sorted(missing)}"
