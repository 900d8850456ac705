"""What every finding has: the drawn :class:`Finding`, its pointwise rendering :class:`Effect`, and the
:class:`FindingKind` interface each finding module implements (parameters, sampling, drawing, wording and
VQA phrases of one kind of finding)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mavilt.data.labels import NEGATIVE, POSITIVE, UNCERTAIN
from mavilt.data.synthetic.wording import Sentence, Wording

if TYPE_CHECKING:
    import random

    from mavilt.data.synthetic.canvas import RenderContext
    from mavilt.data.synthetic.case import Case

PRESENT, HEDGED = "present", "uncertain"  # Finding.certainty values
UNCERTAIN_FRACTION = 0.2  # of hedgeable findings, how many the report states as uncertain


@dataclass
class Finding:
    """One finding as drawn: what the report says about it and all the geometry the renderer needs.

    ``side`` is the patient's side ("right" is on the image's left). ``params`` holds geometry drawn at
    sample time (never at render time), so removing a finding leaves every other pixel unchanged.
    """

    name: str
    certainty: str = PRESENT  # "present" | "uncertain"
    side: str | None = None  # "right" | "left" | "bilateral"
    size: str | None = None  # effusion small/moderate/large, pneumothorax small/large, nodule nodule/mass
    zone: str | None = None  # "upper" | "middle" | "lower"
    params: dict[str, Any] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()  # devices: "ett", "cvc", "ng"

    @property
    def strength(self) -> float:
        """Uncertain findings are drawn at half intensity."""
        return 1.0 if self.certainty == PRESENT else 0.5

    @property
    def sides(self) -> tuple[str, ...]:
        if self.side == "bilateral":
            return ("right", "left")
        return (self.side,) if self.side else ()


@dataclass
class Effect:
    """A finding's pointwise effect; every array is exactly zero (one for factors) outside ``support``."""

    support: np.ndarray
    opacity: np.ndarray | None = None  # fraction of lung air replaced by fluid/tissue
    hide: np.ndarray | None = None  # fraction of lung markings hidden
    extra_air: np.ndarray | None = None  # added lucency (pneumothorax)
    add: np.ndarray | None = None  # added density (nodule, pleural line, tubes)
    boost: np.ndarray | None = None  # relative increase of vascular markings (congestion)


class FindingKind:
    """One kind of finding: its vocabulary, how it is drawn at random, rendered, worded and asked about.

    Subclasses set the class attributes and implement :meth:`fill`, :meth:`effect` and :meth:`text`.
    Cardiomegaly and devices, whose findings-section sentences need more than the finding (the view, normal
    statements), have no :meth:`text`: the report calls their own hooks and their :meth:`impression`.
    """

    name: ClassVar[str]
    observation: ClassVar[str]  # the CheXpert observation its sentences label
    plain_name: ClassVar[str]  # the answer to "what is the main abnormality?"
    prevalence: ClassVar[float]  # per-study probability (devices depend on the view: see chance())
    presence_np: ClassVar[str] = ""  # "Is there ___?"
    hedgeable: ClassVar[bool] = True  # may be reported as uncertain
    lateralised: ClassVar[bool] = False  # asked "which side?" when certain
    noun: ClassVar[str] = ""  # "the ___" in laterality and size questions
    size_choices: ClassVar[tuple[str, ...]] = ()  # asked "how large?" when certain; these are the answers
    negations: ClassVar[tuple[str, ...]] = ()  # what the report may say when it is absent

    # ---- sampling

    def chance(self, view: str) -> float:
        """Probability that a study in ``view`` has this finding."""
        return self.prevalence

    def sample(self, rng: np.random.Generator, case: Case) -> Finding:
        """Draw one finding for ``case`` (whose earlier findings, e.g. an enlarged heart, are already in it)."""
        uncertain = self.hedgeable and rng.random() < UNCERTAIN_FRACTION
        f = Finding(name=self.name, certainty=HEDGED if uncertain else PRESENT)
        self.fill(rng, case, f)
        return f

    def fill(self, rng: np.random.Generator, case: Case, f: Finding) -> None:
        """Draw ``f``'s side, size, zone and geometry; ``f.certainty`` is already drawn."""
        raise NotImplementedError

    # ---- rendering

    def effect(self, ctx: RenderContext, f: Finding) -> Effect | None:
        """What ``f`` does to the pixels; None when it changes the anatomy instead (cardiomegaly)."""
        raise NotImplementedError

    def support(self, ctx: RenderContext, f: Finding) -> np.ndarray:
        """Boolean mask of the pixels ``f`` may change."""
        eff = self.effect(ctx, f)
        if eff is None:
            raise NotImplementedError(f"{self.name} changes the anatomy and must define its own support")
        return eff.support

    # ---- report

    def text(self, f: Finding, w: Wording, impression: bool = False) -> str:
        """The sentence stating ``f`` in the findings section, or in the impression."""
        raise NotImplementedError(f"{self.name} has no single-sentence wording")

    def sentence(self, f: Finding, w: Wording, impression: bool = False) -> Sentence:
        value = POSITIVE if f.certainty == PRESENT else UNCERTAIN
        return Sentence(self.text(f, w, impression), {self.observation: value})

    def impression(self, f: Finding, w: Wording) -> list[Sentence]:
        """The impression's sentences about ``f``."""
        return [self.sentence(f, w, impression=True)]

    def negation(self, w: Wording) -> Sentence:
        """A sentence saying the finding is absent."""
        return Sentence(w.choice(self.negations), {self.observation: NEGATIVE})

    # ---- VQA

    def presence_question(self, w: random.Random) -> str:
        np_ = self.presence_np
        return w.choice([f"Is there {np_}?", f"Does this chest X-ray show {np_}?", f"Is there evidence of {np_}?",
                         f"Does the image show {np_}?"])

    def laterality_question(self, w: random.Random) -> str:
        n = self.noun
        return w.choice([f"Which side is the {n} on?", f"On which side is the {n}?",
                         f"Is the {n} on the left, the right, or both sides?"])

    def size_question(self, w: random.Random) -> str:
        n = self.noun
        return w.choice([f"How large is the {n}?", f"What is the size of the {n}?"])
