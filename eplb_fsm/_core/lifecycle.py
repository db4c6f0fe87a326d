"""The rebalance lifecycle of one model, as a pure state machine.

Rules (why the table looks as it does; see docs/design.md):

1. A state changes only at an *agreed step*, and only on inputs that are
   identical on every rank: the step counter, the result of an all-reduce,
   the deterministic plan. So every rank fires the same triggers with the
   same facts at the same step, and every rank's history is identical.
2. A rank's local progress (its planning thread returned, its staging
   transfer completed) is *not* a state. It is the flag the rank contributes
   to the next readiness round; the round's result is the shared fact.
3. Guards read only the facts passed with the trigger (``send_event``),
   never the world. Transitions have no callbacks: this module does no I/O,
   so it can be tested without ranks, devices or an event loop, and the
   runtime that fires the triggers owns every side effect.

States:

- ``collecting``: serving, recording load into the window.
- ``planning``: the window's load was all-reduced and a plan is computed
  off the event loop; readiness rounds repeat until every rank has it.
- ``staging``: one batch of layers' transfer was launched everywhere at an
  agreed step; it runs on a side stream while serving goes on.
- ``awaiting_all_ranks``: a readiness round was launched everywhere; it
  resolves `lag` steps later with the same answer everywhere.
- ``committing``: every rank applies the same layers at the same step.
- ``failed``: a peer timed out or a rank reported an error; layers not
  committed everywhere keep their old placement. ``recover`` returns to
  ``collecting``.

The elastic path (the rank set changes; see docs/elastic.md), entered from
``collecting`` by ``reconfigure`` on every rank of the old and new sets at
the same step:

- ``reconfiguring``: the union of old and new ranks agreed on the new rank
  set and the window's load, every rank planned the same placement for the
  new set, and the weights move over the union group (leaving ranks send,
  joining ranks receive). It resolves once, with the union's answer.
- ``salvaging``: the handoff did not complete everywhere (a leaving rank
  died): the live ranks move every surviving copy to its new slots.
- ``resizing``: every new rank commits the resized maps at the same step;
  ``resized`` ends in ``collecting``, or in ``failed`` when experts were lost
  (no copy survived; the engine must reload them).
- ``released``: a leaving rank's final state, once its experts are handed off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from transitions import EventData, Machine

# `transitions` logs every state entry at INFO; one rebalance of a 58-layer
# model would flood a serving log. We log transitions ourselves, at DEBUG.
# A level the application set explicitly is left alone.
if logging.getLogger("transitions").level == logging.NOTSET:
    logging.getLogger("transitions").setLevel(logging.WARNING)

__all__ = [
    "STATES",
    "TRANSITIONS",
    "Facts",
    "Lifecycle",
    "TransitionRecord",
    "mermaid_diagram",
]

COLLECTING = "collecting"
PLANNING = "planning"
STAGING = "staging"
AWAITING = "awaiting_all_ranks"
COMMITTING = "committing"
FAILED = "failed"
RECONFIGURING = "reconfiguring"
SALVAGING = "salvaging"
RESIZING = "resizing"
RELEASED = "released"

STATES: tuple[str, ...] = (COLLECTING, PLANNING, STAGING, AWAITING, COMMITTING, FAILED,
                           RECONFIGURING, SALVAGING, RESIZING, RELEASED)

# The lifecycle, as data. For one trigger and source, rows are tried in
# order; the first whose guards hold fires (transitions' own semantics).
TRANSITIONS: tuple[dict[str, Any], ...] = (
    {"trigger": "interval_reached", "source": COLLECTING, "dest": PLANNING},
    {"trigger": "plan_agreed", "source": PLANNING, "dest": STAGING,
     "conditions": "worth_moving"},
    {"trigger": "plan_agreed", "source": PLANNING, "dest": COLLECTING,
     "unless": "worth_moving"},  # dropped: the predicted gain is too small
    {"trigger": "round_launched", "source": STAGING, "dest": AWAITING},
    {"trigger": "round_resolved", "source": AWAITING, "dest": COMMITTING,
     "conditions": "all_ready"},
    {"trigger": "round_resolved", "source": AWAITING, "dest": STAGING,
     "unless": "all_ready"},
    {"trigger": "layers_committed", "source": COMMITTING, "dest": STAGING,
     "unless": "all_layers_done"},
    {"trigger": "layers_committed", "source": COMMITTING, "dest": COLLECTING,
     "conditions": "all_layers_done"},
    {"trigger": "fail", "source": [PLANNING, STAGING, AWAITING, COMMITTING], "dest": FAILED},
    {"trigger": "recover", "source": FAILED, "dest": COLLECTING},
    # The elastic path: the rank set changes (EplbRuntime.reconfigure / join).
    {"trigger": "reconfigure", "source": COLLECTING, "dest": RECONFIGURING},
    {"trigger": "handoff_resolved", "source": RECONFIGURING, "dest": RESIZING,
     "conditions": "all_ready"},
    {"trigger": "handoff_resolved", "source": RECONFIGURING, "dest": SALVAGING,
     "unless": "all_ready"},  # a union rank did not answer: move surviving copies only
    {"trigger": "salvaged", "source": SALVAGING, "dest": RESIZING},
    {"trigger": "resized", "source": RESIZING, "dest": COLLECTING, "conditions": "nothing_lost"},
    {"trigger": "resized", "source": RESIZING, "dest": FAILED, "unless": "nothing_lost"},
    {"trigger": "handed_off", "source": RECONFIGURING, "dest": RELEASED},  # a leaving rank
    {"trigger": "fail", "source": [RECONFIGURING, SALVAGING], "dest": FAILED},
)

GUARDS: dict[str, str] = {
    "worth_moving": "the plan's predicted balancedness gain reaches the configured minimum",
    "all_ready": "every rank reported its staged layers complete",
    "all_layers_done": "no changed layer is left to stage",
    "nothing_lost": "every logical expert kept a copy on the new ranks",
}


@dataclass(frozen=True)
class Facts:
    """Inputs to the guards: identical on every rank by construction."""

    worth_moving: bool = False
    all_ready: bool = False
    all_layers_done: bool = False
    nothing_lost: bool = True


class TransitionRecord(NamedTuple):
    step: int
    source: str
    dest: str
    trigger: str


@dataclass
class _Model:
    """The object `transitions` decorates: a state name and the guards."""

    state: str = COLLECTING
    facts: Facts = field(default_factory=Facts)

    def worth_moving(self, event: EventData) -> bool:
        return bool(event.kwargs["facts"].worth_moving)

    def all_ready(self, event: EventData) -> bool:
        return bool(event.kwargs["facts"].all_ready)

    def all_layers_done(self, event: EventData) -> bool:
        return bool(event.kwargs["facts"].all_layers_done)

    def nothing_lost(self, event: EventData) -> bool:
        return bool(event.kwargs["facts"].nothing_lost)


class Lifecycle:
    """One model's state, the table above, and the history of transitions."""

    def __init__(self) -> None:
        self._model = _Model()
        self._machine = Machine(
            model=self._model,
            states=list(STATES),
            transitions=[dict(t) for t in TRANSITIONS],
            initial=COLLECTING,
            send_event=True,
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )
        self.history: list[TransitionRecord] = []

    @property
    def state(self) -> str:
        return self._model.state

    def fire(self, trigger: str, step: int, facts: Facts | None = None) -> str:
        """Fire `trigger` at `step`; return the new state.

        Raises `transitions.MachineError` if the trigger is not valid in the
        current state: the runtime asked for something the table forbids,
        which is a bug, not a condition to absorb.
        """
        source = self._model.state
        self._machine.events[trigger].trigger(self._model, facts=facts or Facts())
        dest = self._model.state
        self.history.append(TransitionRecord(step, source, dest, trigger))
        return dest

    def may_fire(self, trigger: str) -> bool:
        return trigger in self._machine.get_triggers(self._model.state)


def _guard_label(row: dict[str, Any]) -> str:
    if "conditions" in row:
        return f" [{row['conditions']}]"
    if "unless" in row:
        return f" [not {row['unless']}]"
    return ""


def mermaid_diagram() -> str:
    """The lifecycle as a Mermaid state diagram, generated from `TRANSITIONS`."""
    lines = ["stateDiagram-v2", f"    [*] --> {COLLECTING}"]
    for row in TRANSITIONS:
        sources = row["source"] if isinstance(row["source"], list) else [row["source"]]
        for source in sources:
            lines.append(f"    {source} --> {row['dest']}: {row['trigger']}{_guard_label(row)}")
    lines.append("")
    for name, meaning in GUARDS.items():
        lines.append(f"    %% {name}: {meaning}")
    return "\n".join(lines)
