"""Loss weights per target token: more signal per step on the tokens that carry the diagnosis.

A report is mostly fixed phrasing ("The osseous structures are intact."); the few tokens that say what the
image shows (the finding, its negation or hedge, its side and its size) are a small share of the loss, so
the model learns the phrasing long before it learns to read the image. Weighting those tokens up (and,
separately, the image codes where an image is the response) moves the gradient toward what decides the
clinical labels. The weights are a lookup by the target token's id, so they cost nothing per step.

Which text tokens count is decided once per tokenizer from :data:`CLINICAL_WORDS`: a token counts when its
text (without the tokenizer's word-start marker, lower-cased) is one of the words, or a word-initial piece
of three or more letters that begins one of them (a BPE split such as "effus" + "ion"). Written here rather
than taken from the labeler: the labeler's regular expressions match phrases, not tokens.
"""

from __future__ import annotations

import torch

from mavilt.llm.vocab import JointVocab

FINDINGS = """
effusion effusions pleural pneumothorax pneumothoraces atelectasis atelectatic collapse consolidation
consolidations consolidative opacity opacities opacification edema congestion vascular cephalization
interstitial cardiomegaly enlarged enlargement enlarging cardiac heart silhouette cardiomediastinal
mediastinum mediastinal widened widening nodule nodules mass masses lesion lesions pneumonia infection
infectious aspiration fracture fractures fractured deformity catheter catheters tube tubes line lines
pacemaker leads lead wires clips device devices port stent valve sternotomy hardware tip blunting
thickening scarring fibrosis granuloma emphysema hyperinflation hernia calcified calcification
""".split()
NEGATION = """
no not without negative free clear normal unremarkable resolved removed absent intact stable unchanged
""".split()
UNCERTAINTY = """
possible possibly likely probable probably may might cannot exclude excluded suspicious concerning
suggestive suggest suggests versus questionable borderline equivocal subtle
""".split()
LATERALITY = """
left right bilateral bilaterally bibasilar bibasal unilateral upper lower mid middle basal basilar apical
apex base bases lobe lobes zone zones lingula retrocardiac perihilar hilar
""".split()
SIZE = """
small moderate large mild mildly severe tiny trace minimal massive marked markedly extensive
""".split()
# Closed VQA answers: "no" is a negation cue, so "yes" must weigh the same or the answers' prior tilts to "no".
ANSWERS = "yes".split()
CLINICAL_WORDS: frozenset[str] = frozenset(FINDINGS + NEGATION + UNCERTAINTY + LATERALITY + SIZE + ANSWERS)
_WORD_START = ("Ġ", "▁", " ")  # GPT-2 style BPE, SentencePiece, plain
# Everyday words that merely begin a clinical one ("with" -> "without"): not clinical by themselves.
_PREFIX_WORDS = frozenset("with can low per pro sub inter mark".split())


def is_clinical_token(piece: str) -> bool:
    """Whether a token's text names a finding, a negation or hedge, a side or a size (see the module doc)."""
    starts_word = piece.startswith(_WORD_START)
    text = piece.lstrip("".join(_WORD_START)).lower().strip(".,;:!?()")
    if not text.isalpha():
        return False
    if text in CLINICAL_WORDS:
        return True
    # A word-initial piece of a longer clinical word; a piece from the middle of a word is not one.
    return starts_word and len(text) >= 3 and text not in _PREFIX_WORDS and any(w.startswith(text) and len(w) > len(text) for w in CLINICAL_WORDS)


def clinical_token_ids(tokenizer, vocab: JointVocab) -> list[int]:
    """The text token ids that carry clinical content for this tokenizer."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab.text_vocab_size)))
    return [i for i, p in enumerate(pieces) if isinstance(p, str) and is_clinical_token(p)]


def token_loss_weights(tokenizer, vocab: JointVocab, clinical: float = 1.0, image: float = 1.0) -> torch.Tensor | None:
    """A weight per joint-vocabulary id (the loss of a target token is scaled by its id's weight), or None
    when both are 1 (no weighting)."""
    for name, v in (("clinical_token_weight", clinical), ("image_token_weight", image)):
        if not v > 0:
            raise ValueError(f"{name}={v}: a loss weight must be positive")
    if clinical == 1.0 and image == 1.0:
        return None
    w = torch.ones(vocab.size)
    if clinical != 1.0:
        w[clinical_token_ids(tokenizer, vocab)] = clinical
    if image != 1.0:
        w[vocab.first_image_id : vocab.first_image_id + vocab.codebook_size] = image
    return w
