"""The layout of every checkpoint a training step writes, each owned by one class.

A checkpoint is a Ray Train checkpoint directory. Every one holds ``train_state.pt`` (what resuming needs),
``config.yaml`` (the resolved config) and ``code_version.txt``, and beside them the step's models in their
loadable form, written with the models' own ``save_pretrained`` so downstream steps never need the training
config to load them::

    encoder job     encoder/                               the CXR encoder phi
    vqgan job       vqgan/   encoder/ (phi, when used)     recon.png
    pretrain_text   llm/     tokenizer/
    stage1/stage2   llm/ (full HF weights) or adapter/ (LoRA over theta_0)   tokenizer/   vocab.json   theta0/
                    deepspeed/ (DeepSpeed's own shards, strategy=deepspeed)

Readers ask these classes for paths; ``find`` accepts a checkpoint or the model folder inside it, on local disk
or on a store, returns :class:`~mavilt.storage.Location` s (local paths made absolute: train workers run in
their own working directory; loaders take ``storage.local_dir`` of them) and fails with one message naming
what is missing and which job writes it. Nothing here imports torch, so a bad path fails fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mavilt.errors import CheckpointError
from mavilt.storage import Location

TRAIN_STATE = "train_state.pt"
CONFIG_FILE = "config.yaml"
CODE_VERSION_FILE = "code_version.txt"


@dataclass(frozen=True)
class ModelFiles:
    """An image-side model folder: ``<stem>.pt`` (state dict) + ``<stem>.json`` (config and metadata)."""

    stem: str

    @property
    def meta(self) -> str:
        return f"{self.stem}.json"

    @property
    def weights(self) -> str:
        return f"{self.stem}.pt"

    def is_in(self, folder: "Path | Location") -> bool:
        return (folder / self.meta).is_file()


VQGAN_FILES = ModelFiles("vqgan")
ENCODER_FILES = ModelFiles("encoder")
KMEANS_FILES = ModelFiles("kmeans")
HF_CONFIG = "config.json"  # marks a Hugging Face model folder
HF_TOKENIZER = "tokenizer.json"  # a fast tokenizer's one file


class Part:
    """A path inside a :class:`Folder` layout, declared once: ``vocab = Part("vocab.json")``."""

    def __init__(self, relative: str):
        self.relative = relative

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, folder: "Folder | None", owner: type) -> Any:
        return self if folder is None else folder.root / self.relative


class Folder:
    """A folder whose layout is declared with :class:`Part` attributes: a local ``Path``, or a
    :class:`~mavilt.storage.Location` (a local path or a URI) as given."""

    def __init__(self, root: "str | Path | Location"):
        self.root = root if isinstance(root, Location) else Path(root)


class TrainCheckpoint(Folder):
    """What every step's checkpoint holds besides its models."""

    train_state = Part(TRAIN_STATE)
    config_file = Part(CONFIG_FILE)
    code_version_file = Part(CODE_VERSION_FILE)


def _find_model(path: str | Path | Location, sub: str, files: ModelFiles, what: str, written_by: str) -> Location:
    """``path/sub`` or ``path`` itself, whichever holds the model (a local path made absolute, or a URI)."""
    p = Location.of(path)
    for cand in (p / sub, p):
        if files.is_in(cand):
            return cand
    step = written_by.split("/")[-1].removesuffix(".py")
    raise CheckpointError(f"{what} {p} holds no {sub}/{files.meta}; pass a checkpoint written by {written_by} "
                          f"(runs/<name>/{step}/checkpoint_*) or its {sub}/ folder")


class EncoderCheckpoint(TrainCheckpoint):
    """``jobs/encoder.py``: the CXR encoder phi in ``encoder/``."""

    encoder = Part("encoder")

    @staticmethod
    def find_model(path: str | Path | Location, what: str = "encoder checkpoint") -> Location:
        return _find_model(path, "encoder", ENCODER_FILES, what, "jobs/encoder.py")


class VQGANCheckpoint(TrainCheckpoint):
    """``jobs/vqgan.py``: the tokenizer in ``vqgan/``, the phi it was trained with in ``encoder/``."""

    vqgan = Part("vqgan")
    phi = Part("encoder")
    recon_grid = Part("recon.png")

    @staticmethod
    def find_model(path: str | Path | Location, what: str = "tokenizer checkpoint") -> Location:
        return _find_model(path, "vqgan", VQGAN_FILES, what, "jobs/vqgan.py")

    @staticmethod
    def phi_beside(vqgan_model: Path | Location) -> Location | None:
        """The phi a VQ-GAN checkpoint carries next to its model folder, when it has one."""
        cand = Location.of(vqgan_model).parent / "encoder"
        return cand if ENCODER_FILES.is_in(cand) else None


class TextLMCheckpoint(TrainCheckpoint):
    """``jobs/pretrain_text.py``: the LM in ``llm/`` and its tokenizer in ``tokenizer/``."""

    llm = Part("llm")
    tokenizer = Part("tokenizer")

    @classmethod
    def find_lm(cls, path: str | Path | Location) -> tuple[Location, Location]:
        """(model folder, tokenizer folder) of a text-pretraining checkpoint or of a plain HF model folder."""
        p = Location.of(path)
        ck = cls(p)
        if (ck.llm / HF_CONFIG).is_file():
            return ck.llm, (ck.tokenizer if ck.tokenizer.is_dir() else ck.llm)
        if (p / HF_CONFIG).is_file():
            return p, p
        raise CheckpointError(f"--init-checkpoint {p} is neither a text-pretraining checkpoint (llm/ + tokenizer/, "
                              "written by jobs/pretrain_text.py) nor a Hugging Face model folder (config.json)")


class Theta0Files(Folder):
    """theta_0: ``theta0.json`` (the immutable base LM by reference, the joint vocabulary) and
    ``theta0_rows.pt`` (the new rows at their initial values)."""

    SPEC = "theta0.json"
    ROWS = "theta0_rows.pt"
    spec = Part(SPEC)
    rows = Part(ROWS)

    def exists(self) -> bool:
        return self.spec.is_file() and self.rows.is_file()


class StageCheckpoint(TrainCheckpoint):
    """``jobs/stage1.py`` / ``jobs/stage2.py``: the LM (full weights or LoRA adapter), its tokenizer, the joint
    vocabulary, theta_0, and DeepSpeed's shards."""

    VOCAB = "vocab.json"
    MODEL_PARTS = ("llm", "adapter", "tokenizer", VOCAB, "theta0")  # what starting from it needs
    llm = Part("llm")  # full Hugging Face weights (ZeRO-3 shards consolidated on rank 0)
    adapter = Part("adapter")  # or: the LoRA adapter over theta_0
    tokenizer = Part("tokenizer")
    vocab = Part(VOCAB)
    deepspeed = Part("deepspeed")

    @property
    def theta0(self) -> Theta0Files:
        return Theta0Files(self.root / "theta0")

    @property
    def is_lora(self) -> bool:
        return self.adapter.is_dir()

    def missing(self) -> list[str]:
        out = []
        if not self.vocab.is_file():
            out.append(self.VOCAB)
        if not (self.llm / HF_CONFIG).is_file() and not self.adapter.is_dir():
            out.append("llm/ (or adapter/)")
        if not self.tokenizer.is_dir():
            out.append("tokenizer/")
        if not self.theta0.exists():
            out.append("theta0/")
        return out

    @classmethod
    def find(cls, path: str | Path | Location, what: str = "--init-checkpoint") -> "StageCheckpoint":
        ck = cls(Location.of(path))
        missing = ck.missing()
        if missing:
            raise CheckpointError(f"{what} {ck.root} is not a stage checkpoint (missing {', '.join(missing)}); pass a "
                                  "checkpoint written by jobs/stage1.py (runs/<name>/stage1/checkpoint_*)")
        return ck
