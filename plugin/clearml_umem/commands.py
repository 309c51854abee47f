"""What the scheduler tells the runtime to do: its only output, plain data."""

from __future__ import annotations

from dataclasses import dataclass

from clearml_umem.tiers import Tier


@dataclass(frozen=True)
class Move:
    """Start moving a model from one tier to another; the runtime reports `on_move_done` or `on_move_failed`."""

    model: str
    src: Tier
    dst: Tier
    reason: str = ""
    """Why, when it is not a request or a placement: an expired keep-alive."""


@dataclass(frozen=True)
class Dispatch:
    """A waiting request may run now: its model is on the GPU and will stay until `on_finished`."""

    model: str
    request_id: str
    served_from: Tier


@dataclass(frozen=True)
class Reject:
    """A request is refused, with the reason and the HTTP status it means."""

    model: str
    request_id: str
    reason: str
    status: int = 503


@dataclass(frozen=True)
class Release:
    """The model left the catalog and is cold: the runtime may drop its engine."""

    model: str


@dataclass(frozen=True)
class PlacementEnded:
    """The placements `ids` of a model ended: `done`, `overtaken` (a later placement to another
    tier replaced them) or `failed`, with the reason; their callers get their answer."""

    model: str
    ids: tuple[str, ...]
    outcome: str
    reason: str = ""


Command = Move | Dispatch | Reject | Release | PlacementEnded
