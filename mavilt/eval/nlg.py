"""Report-generation metrics: BLEU-1..4, METEOR, ROUGE-L and CIDEr with ``pycocoevalcap``, the R2Gen way.

Both sides are normalised before scoring (:func:`normalize_report`: lowercase, punctuation stripped, whitespace
collapsed, optional cut to ``max_words``: 60 for IU X-ray, 100 for MIMIC-CXR in the R2Gen convention) and scored
as one corpus, one reference per hypothesis. The scores are pycocoevalcap's own corpus scores (BLEU pools n-gram
counts with the "closest" reference length, METEOR pools its statistics, ROUGE-L and CIDEr average per sample;
CIDEr's document frequencies come from the references being scored, so it is meaningful only on a corpus).

METEOR 1.5 runs in Java. The JVM is started once per process, on first use, and stopped at exit; a lock makes
calls from several threads take turns. Without Java, :func:`score` raises :class:`MeteorUnavailableError` unless
``include_meteor=False``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence

from mavilt.data.reports import normalize_for_metrics

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# An empty hypothesis is scored as this one token. pycocoevalcap's scorers assume non-empty strings (METEOR's
# line protocol and ROUGE's token split misbehave on "", depending on version); a token that no normalised
# reference can contain (and no METEOR stem/synonym/paraphrase matches) makes the sample count as a wrong
# one-word report: zero matches, so it lowers every metric without crashing any scorer.
EMPTY_PLACEHOLDER = "emptyhypothesisplaceholder"

_JAVA_HINT = (
    "METEOR needs a Java runtime: apt install default-jre-headless "
    "(or set metrics without METEOR via include_meteor=False)"
)


class MeteorUnavailableError(RuntimeError):
    """METEOR cannot run here (no Java, or its JVM failed)."""


def normalize_report(text: str | None, max_words: int | None = None) -> str:
    """The R2Gen normalisation used for every metric (see :func:`mavilt.data.reports.normalize_for_metrics`)."""
    return normalize_for_metrics(text, max_words)


# --- METEOR: one JVM per process -----------------------------------------------------------------------------
class _MeteorProcess:
    """pycocoevalcap's METEOR wrapper, with its JVM's stderr discarded (an undrained pipe can block it) and an
    explicit close."""

    def __init__(self, java: str) -> None:
        from pycocoevalcap.meteor import meteor as meteor_mod

        jar_dir = os.path.dirname(os.path.abspath(meteor_mod.__file__))
        jar = os.path.join(jar_dir, meteor_mod.METEOR_JAR)
        if not os.path.exists(jar):
            raise MeteorUnavailableError(f"METEOR jar not found at {jar}: reinstall pycocoevalcap")
        cmd = [java, "-jar", "-Xmx2G", meteor_mod.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        proc = subprocess.Popen(cmd, cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # Built around the running process (not via Meteor.__init__, which would start its own with stderr piped).
        self._scorer = meteor_mod.Meteor.__new__(meteor_mod.Meteor)
        self._scorer.meteor_cmd = cmd
        self._scorer.meteor_p = proc
        self._scorer.lock = threading.Lock()
        log.info("started METEOR 1.5 (pid %d)", proc.pid)

    def alive(self) -> bool:
        return self._scorer.meteor_p.poll() is None

    def compute_score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
        return self._scorer.compute_score(gts, res)

    def close(self) -> None:
        p = self._scorer.meteor_p
        if p.poll() is None:
            try:
                p.stdin.close()  # the jar exits at end of input
                p.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
        for stream in (p.stdin, p.stdout):
            if stream is not None and not stream.closed:
                stream.close()


_meteor: _MeteorProcess | None = None
_meteor_lock = threading.Lock()


def _close_meteor() -> None:
    global _meteor
    with _meteor_lock:
        if _meteor is not None:
            _meteor.close()
            _meteor = None


atexit.register(_close_meteor)


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailableError(_JAVA_HINT)
    return java


def _meteor_score(gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    global _meteor
    java = _java()  # checked on every call: a cached JVM must not hide a broken setup from the caller
    with _meteor_lock:
        if _meteor is None or not _meteor.alive():
            if _meteor is not None:
                log.warning("METEOR's JVM exited; starting a new one")
                _meteor.close()
            try:
                _meteor = _MeteorProcess(java)
            except OSError as e:
                raise MeteorUnavailableError(f"could not start METEOR with {java}: {e}. {_JAVA_HINT}") from e
        try:
            value, _ = _meteor.compute_score(gts, res)
        except (ValueError, OSError) as e:  # an empty/garbled line from a dead JVM, or a broken pipe
            _meteor.close()
            _meteor = None
            raise MeteorUnavailableError(f"METEOR's Java process failed ({e}); check `java -version` works") from e
    return float(value)


# --- Public API ----------------------------------------------------------------------------------------------
def score(
    references: Sequence[str],
    hypotheses: Sequence[str],
    *,
    max_words: int | None = None,
    include_meteor: bool = True,
) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``hypotheses`` against ``references`` (one each, same order).

    Texts are normalised with :func:`normalize_report` (``max_words`` cuts both sides). Empty hypotheses count
    as wrong (see :data:`EMPTY_PLACEHOLDER`); empty references are an error (drop studies without the section,
    as R2Gen does). With ``include_meteor=False`` the result has no ``"METEOR"`` key.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("score takes lists of reports, not single strings")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(references)} references but {len(hypotheses)} hypotheses: pass one generated report per "
            "reference, in the same order"
        )
    if len(references) == 0:
        raise ValueError("score needs at least one reference/hypothesis pair")
    if include_meteor:
        _java()  # fail before the slow part

    refs = [normalize_report(r, max_words) for r in references]
    empty_refs = [i for i, r in enumerate(refs) if not r]
    if empty_refs:
        shown = ", ".join(map(str, empty_refs[:10])) + (" ..." if len(empty_refs) > 10 else "")
        raise ValueError(
            f"{len(empty_refs)} reference(s) are empty after normalisation (indices {shown}): drop studies "
            "without this report section before scoring"
        )
    hyps = [normalize_report(h, max_words) or EMPTY_PLACEHOLDER for h in hypotheses]
    n_empty = sum(h == EMPTY_PLACEHOLDER for h in hyps)
    if n_empty:
        log.info("%d of %d hypotheses are empty; scored as wrong one-word reports", n_empty, len(hyps))

    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    if include_meteor:
        out["METEOR"] = _meteor_score(gts, res)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out
