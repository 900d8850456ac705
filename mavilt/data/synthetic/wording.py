"""Building blocks of report sentences: a sentence with its label effects, the paraphrase picker and the
lobe/zone phrase several findings share. The report's structure is in :mod:`mavilt.data.synthetic.report`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sentence:
    """One report sentence and the CheXpert labels it states (observation -> 1, -1 or 0)."""

    text: str
    effects: dict[str, int] = field(default_factory=dict)


def cap(s: str) -> str:
    """``s`` with its first letter upper-cased; unlike ``str.capitalize`` it leaves the rest as it is."""
    return s[0].upper() + s[1:] if s else s


class Wording(random.Random):
    """Picks paraphrases; remembers location phrases so the findings and the impression name a place alike."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.memo: dict[tuple, Any] = {}

    def once(self, key: tuple, options: Sequence[Any]) -> Any:
        """The same choice among ``options`` every time ``key`` is asked for."""
        if key not in self.memo:
            self.memo[key] = self.choice(options)
        return self.memo[key]


def zone_phrase(side: str, zone: str, w: Wording) -> str:
    """A lobe or zone of one lung, e.g. "right upper lobe"."""
    options = {
        ("right", "upper"): ["right upper lobe", "right upper zone"],
        ("right", "middle"): ["right middle lobe", "right mid lung zone"],
        ("right", "lower"): ["right lower lobe", "right lung base", "right lower zone"],
        ("left", "upper"): ["left upper lobe", "left upper zone"],
        ("left", "middle"): ["left mid lung zone", "left midlung zone"],
        ("left", "lower"): ["left lower lobe", "left lung base", "left lower zone"],
    }[(side, zone)]
    return w.once(("zone", side, zone), options)

