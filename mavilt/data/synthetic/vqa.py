"""Closed VQA questions about a case: presence, laterality, size and the main abnormality.

The question wording of each finding lives in its module under :mod:`mavilt.data.synthetic.findings`; which
questions a case gets, and how yes and no answers are balanced, is decided here.
"""

from __future__ import annotations

import random
from typing import Any

from mavilt.data.synthetic.case import Case
from mavilt.data.synthetic.findings import FINDINGS, IMPORTANCE, PLAIN_NAMES, PRESENT, kind

ABNORMALITY_CHOICES: list[str] = [PLAIN_NAMES[f] for f in IMPORTANCE] + ["none"]
LATERALITY_CHOICES: list[str] = ["left", "right", "bilateral"]


def case_vqa(case: Case) -> list[dict[str, Any]]:
    """3-6 closed questions about ``case``: presence, laterality, size and the main abnormality.

    Presence questions ask about as many absent as present findings; uncertain findings are never asked
    about (their answer would be a guess), so "yes" always means the finding's label is 1.
    """
    w = random.Random(case.report_seed * 2 + 7)
    certain = [f for f in case.findings if f.certainty == PRESENT]
    uncertain = {f.name for f in case.findings if f.certainty != PRESENT}
    present_names = [f.name for f in certain]
    absent = [n for n in FINDINGS if n not in present_names and n not in uncertain]
    tail: list[dict[str, Any]] = []
    lateral = [f for f in certain if kind(f.name).lateralised]
    if lateral:
        f = w.choice(lateral)
        q = kind(f.name).laterality_question(w)
        tail.append({"question": q, "answer": f.side, "type": "laterality", "choices": list(LATERALITY_CHOICES)})
    sized = [f for f in certain if kind(f.name).size_choices]
    if sized:
        f = w.choice(sized)
        k = kind(f.name)
        tail.append({"question": k.size_question(w), "answer": f.size, "type": "size", "choices": list(k.size_choices)})
    main = next((n for n in IMPORTANCE if n in present_names), None)
    if main is not None or not uncertain:
        q = w.choice(["What is the main abnormality?", "What is the most significant finding?",
                      "Which abnormality is most prominent?"])
        tail.append({"question": q, "answer": PLAIN_NAMES[main] if main else "none", "type": "abnormality",
                     "choices": list(ABNORMALITY_CHOICES)})
    # Presence: abnormal studies get one "yes" more than "no" (normal ones only "no"), which balances the
    # answers over the dataset; at least three questions in all, at most six.
    n_yes = min(len(present_names), 3)
    n_no = max(1, 3 - len(tail) - n_yes)
    while n_yes + n_no + len(tail) > 6:
        if n_yes > n_no:
            n_yes -= 1
        else:
            n_no -= 1
    n_no = min(n_no, len(absent))
    yes = w.sample(present_names, n_yes)
    no = w.sample(absent, n_no)
    items = [{"question": kind(n).presence_question(w), "answer": "yes" if n in yes else "no", "type": "presence",
              "choices": ["yes", "no"]} for n in yes + no]
    return items + tail
