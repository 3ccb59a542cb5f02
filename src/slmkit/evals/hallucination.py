"""A domain hallucination check: of a model's answers that should name one label of a closed set
(a disease, a category), the share that name none.

Answers and labels are compared after normalisation (lower case, punctuation and extra spaces
dropped, first line only). An answer is in the set when it is a label, or contains exactly one
label as a whole phrase ("It is most likely migraine." -> migraine); one naming two labels is
counted as ambiguous, not as a hallucination.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from slmkit.errors import SlmError


@dataclass
class LabelCheck:
    total: int
    in_set: int
    ambiguous: int
    out_of_set: int
    labels_named: Counter = field(default_factory=Counter)  # normalised label -> answers naming it
    examples: list[str] = field(default_factory=list)  # a few out-of-set answers, as generated

    @property
    def hallucination_rate(self) -> float:
        return self.out_of_set / self.total if self.total else 0.0

    def summary(self) -> str:
        return (f"{self.out_of_set}/{self.total} answers name no known label ({self.hallucination_rate:.1%}); "
                f"{self.ambiguous} name several")


def normalise(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return " ".join(re.sub(r"[^\w\s]", " ", first.lower()).split())


def check_labels(answers: list[str], labels: list[str], keep_examples: int = 10) -> LabelCheck:
    known = sorted({normalise(label) for label in labels} - {""}, key=len, reverse=True)
    if not known:
        raise SlmError("the label set is empty: nothing to check answers against")
    result = LabelCheck(len(answers), 0, 0, 0)
    for answer in answers:
        text = normalise(answer)
        if text in known:
            named = [text]
        else:
            named = [label for label in known if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text)]
            named = [n for n in named if not any(n != other and n in other for other in named)]  # "flu" in "stomach flu"
        if len(named) == 1:
            result.in_set += 1
            result.labels_named[named[0]] += 1
        elif named:
            result.ambiguous += 1
        else:
            result.out_of_set += 1
            if len(result.examples) < keep_examples:
                result.examples.append(answer)
    return result
