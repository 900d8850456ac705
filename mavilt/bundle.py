"""The model bundle: the one thing evaluation, serving and the inference CLI load.

A directory with ``mavilt.json`` (format version, preset, config, code version, the joint vocabulary, image
size, and relative paths) and, beside it, ``vqgan/``, ``encoder/`` (when known), ``tokenizer/``, and the LLM
as full Hugging Face weights (``llm/``) or as theta_0 (``theta0/``: base reference + new rows) plus a LoRA
adapter (``adapter/``). :func:`load_bundle` is the only loader.

A bundle may live on local disk or on a store (:mod:`mavilt.storage`). ``mavilt.json`` is its publication
marker: written last, removed first when a bundle is replaced, and it records the hash of every file, so a
bundle on a store is copied into the local cache once per content and loaded from there.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mavilt.checkpoints import StageCheckpoint, Theta0Files
from mavilt.config import Config, config_from_dict
from mavilt.errors import BundleError
from mavilt.hashing import content_hash
from mavilt.llm.vocab import JointVocab
from mavilt.storage import Location, local_dir, publish_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "mavilt.json"
PARTS = ("vqgan", "encoder", "tokenizer", "llm", "adapter", "theta0")  # the manifest's "paths" keys

# What a loader may ask for (``load_bundle(parts=...)``): a server's deployment loads only what it serves.
IMAGE_ENCODER = "image_encoder"  # the VQ-GAN's encoder and codebook: image -> codes
LANGUAGE_MODEL = "llm"  # the LLM and its text tokenizer: codes <-> text, VQA
IMAGE_DECODER = "image_decoder"  # the VQ-GAN's codebook and decoder: codes -> image
CXR_ENCODER = "cxr_encoder"  # the in-house CXR encoder (phi), when the bundle has one: evaluation's FID
LOADABLE = (IMAGE_ENCODER, LANGUAGE_MODEL, IMAGE_DECODER, CXR_ENCODER)


def write_bundle(out: Path | Location, stage2: StageCheckpoint, vqgan_dir: Path | Location,
                 encoder_dir: Path | Location | None, cfg: Config) -> Location:
    """Assemble a bundle from the best stage-2 checkpoint and the tokenizer (and encoder) it was trained with,
    in a local folder, and publish it at ``out`` (a local path or a URI)."""
    with tempfile.TemporaryDirectory(prefix="mavilt-bundle-") as tmp:
        _assemble(Path(tmp), stage2, vqgan_dir, encoder_dir, cfg)
        return publish_dir(tmp, out, MANIFEST)


def _assemble(tmp: Path, stage2: StageCheckpoint, vqgan_dir, encoder_dir, cfg: Config) -> None:
    from mavilt.llm.checkpoint import read_vocab
    from mavilt.runs import code_version

    sources = {"vqgan": vqgan_dir, "encoder": encoder_dir, "tokenizer": stage2.tokenizer}
    if stage2.is_lora:
        sources.update(adapter=stage2.adapter, theta0=stage2.theta0.root)
    else:
        sources["llm"] = stage2.llm
    paths: dict[str, str | None] = {part: None for part in PARTS}
    for part, src in sources.items():
        if src is not None:
            Location.of(src).download(tmp / part)
            paths[part] = part
    vocab = read_vocab(stage2)
    manifest = {
        "format_version": FORMAT_VERSION,
        "preset": cfg.preset,
        "code_version": code_version(),
        "image_size": cfg.data.image_size,
        "vocab": vocab.to_dict(),
        "paths": paths,
        "source_checkpoint": str(stage2.root),
        "content_hash": content_hash(tmp, recursive=True),  # so a copy in a cache is keyed by content
        "config": cfg.to_dict(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


@dataclass
class Bundle:
    path: Path  # the local folder it was loaded from (a cached copy when it lives on a store)
    config: Config
    vocab: JointVocab
    image_size: int
    tokenizer: Any  # None when loaded without the LLM
    llm: torch.nn.Module | None
    vqgan: torch.nn.Module | None  # only the halves loaded (``parts``)
    encoder: torch.nn.Module | None
    device: torch.device
    manifest: dict[str, Any] = field(default_factory=dict)
    parts: tuple[str, ...] = LOADABLE
    _warned_contrast: bool = field(default=False, repr=False)

    def _need(self, part: str) -> None:
        if part not in self.parts:
            raise BundleError(f"the bundle at {self.path} was loaded without its {part} (parts={list(self.parts)}): "
                              f"load it with {part!r} among the parts")

    # ---- helpers ---------------------------------------------------------------------------------
    @property
    def codec(self):
        from mavilt.llm.sequences import TextCodec

        self._need(LANGUAGE_MODEL)
        if not hasattr(self, "_codec"):
            self._codec = TextCodec(self.tokenizer)
        return self._codec

    def to_tensor(self, images: Sequence[np.ndarray] | torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] ([H, W] arrays or a [B, 1, H, W] tensor) at the bundle's size."""
        from mavilt.data.images import resize_pad

        if isinstance(images, torch.Tensor):
            x = images.float()
            if x.ndim == 3:
                x = x[:, None]
        else:
            arrs = [a if a.shape == (self.image_size, self.image_size) else resize_pad(np.asarray(a, np.float32), self.image_size)
                    for a in images]
            x = torch.from_numpy(np.stack(arrs)[:, None].astype(np.float32))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise BundleError(f"images must be {self.image_size}x{self.image_size}, got {tuple(x.shape[-2:])}")
        return x.clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        self._need(IMAGE_ENCODER)
        return self.vqgan.encode(self.to_tensor(images).to(self.device)).cpu()

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        self._need(IMAGE_DECODER)
        return self.vqgan.decode(codes.to(self.device)).float().cpu()

    # ---- the three tasks -------------------------------------------------------------------------
    def report_from_codes(self, codes: torch.Tensor, *, section: str | None = None, **overrides) -> list[str]:
        from mavilt.llm.generate import generate_text
        from mavilt.llm.tasks import REPORT

        g = self._gen(overrides)
        trained = self.config.stage2.report_section
        section = section or trained
        if section != trained:  # its answer would be the trained section's style under another name
            raise BundleError(f"the bundle at {self.path} was trained to write the {trained} section, never the "
                              f"{section} section: ask for {trained}, or train a bundle with "
                              f"stage2.report_section={section}")
        prompts = [REPORT.prompt(self.vocab, self.codec, c.numpy(), section=section) for c in codes]
        contrast = None
        # A greedy-decoding setting: a call that asks for beams or sampling decodes without it.
        if g.image_contrast > 0 and g.num_beams == 1 and not g.do_sample and self._contrast_supported():
            # The same prompt around random codes (what the model writes without an image), the same for every
            # row, so a report does not depend on the batch it was served in.
            noise = torch.randint(0, self.vocab.codebook_size, (g.image_contrast_draws, *codes.shape[1:]),
                                  generator=torch.Generator().manual_seed(g.seed))
            contrast = [REPORT.prompt(self.vocab, self.codec, draw.numpy(), section=section)
                        for draw in noise for _ in prompts]
        ids = generate_text(self.llm, self.vocab, prompts, max_new_tokens=g.max_new_tokens, num_beams=g.num_beams,
                            do_sample=g.do_sample, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed,
                            contrast_prompts=contrast, contrast=g.image_contrast if contrast else 0.0)
        first = [self.codec.decode(x) for x in ids]
        if g.rerank_candidates <= 1:
            return first
        return self._rerank(codes, prompts, first, g)

    def _contrast_supported(self) -> bool:
        """Contrastive decoding runs on the lean Llama decoder; another LM decodes greedily, with one warning."""
        from mavilt.llm.decode import LlamaDecoder

        if LlamaDecoder.supports(self.llm):
            return True
        if not self._warned_contrast:
            log.warning("generate.image_contrast=%s needs a Llama-style LM; the bundle at %s has %s: its reports are "
                        "decoded greedily without the contrast", self.config.generate.image_contrast, self.path,
                        type(self.llm).__name__)
            self._warned_contrast = True
        return False

    def _rerank(self, codes: torch.Tensor, prompts: list[list[int]], first: list[str], g) -> list[str]:
        """``generate.rerank_candidates``: sampled candidates besides ``first``, the one phi agrees with kept."""
        from mavilt.eval.fidelity import observation_probabilities
        from mavilt.llm.generate import generate_text
        from mavilt.eval.rerank import rerank_reports

        if self.encoder is None or IMAGE_DECODER not in self.parts:
            raise BundleError(f"generate.rerank_candidates={g.rerank_candidates} needs the bundle's CXR encoder and "
                              f"VQ-GAN decoder; the bundle at {self.path} was loaded without them (or has no encoder): "
                              "set generate.rerank_candidates=0")
        probs = observation_probabilities(self.encoder, self.decode_codes(codes).to(self.device))

        def sample(k: int) -> list[str]:
            ids = generate_text(self.llm, self.vocab, prompts, max_new_tokens=g.max_new_tokens, do_sample=True,
                                temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed + k)
            return [self.codec.decode(x) for x in ids]

        return rerank_reports(first, sample, g.rerank_candidates, probs)

    def report(self, images, **overrides) -> list[str]:
        """CXR -> report text (the configured section)."""
        return self.report_from_codes(self.encode_images(images), **overrides)

    def synthesize_codes(self, texts: Sequence[str], seeds: Sequence[int] | None = None, **overrides) -> torch.Tensor:
        """Report text -> codes [B, N]; ``seeds`` one per text (default: the ``seed`` setting + the row's index)."""
        from mavilt.llm.generate import generate_image_codes
        from mavilt.llm.tasks import SYNTHESIZE

        g = self._gen(overrides)
        ml = self.config.llm.max_length
        budget = SYNTHESIZE.text_budget(self.vocab, self.codec, ml)
        over = [n for n in (len(self.codec.encode(t)) for t in texts) if n > budget]
        if over:  # the model draws from what fits: say how much of the text it never saw (one line per call)
            n = max(over)
            which = "the report text has" if len(texts) == 1 else f"{len(over)} of {len(texts)} report texts have up to"
            log.warning("%s %d tokens and the model's context (llm.max_length %d, %d of it image codes) leaves room "
                        "for %d: the last %d tokens (about %d%% of the text) are not used", which, n, ml,
                        self.vocab.tokens_per_image, budget, n - budget, round(100 * (n - budget) / n))
        prompts = [SYNTHESIZE.prompt(self.vocab, self.codec, t, max_length=ml) for t in texts]
        uncond = [SYNTHESIZE.prompt(self.vocab, self.codec, None, max_length=ml) for _ in texts]
        return generate_image_codes(self.llm, self.vocab, prompts, uncond_prompts=uncond, cfg_scale=g.cfg_scale,
                                    temperature=g.image_temperature, top_k=g.top_k, top_p=g.top_p if g.do_sample else 1.0,
                                    seed=g.seed if seeds is None else list(seeds))

    def synthesize(self, texts: Sequence[str], seeds: Sequence[int] | None = None, **overrides) -> torch.Tensor:
        """Report text -> images [B, 1, H, W] in [0, 1]."""
        return self.decode_codes(self.synthesize_codes(texts, seeds, **overrides))

    def vqa_from_codes(self, codes: torch.Tensor, questions: Sequence[str], choices: Sequence[Sequence[str] | None]) -> list[dict[str, Any]]:
        from mavilt.llm.generate import answer_probabilities, generate_text
        from mavilt.llm.tasks import VQA

        prompts = [VQA.prompt(self.vocab, self.codec, c.numpy(), q) for c, q in zip(codes, questions)]
        ml = self.config.llm.max_length
        for p, q in zip(prompts, questions):
            if len(p) >= ml - 2:  # no room left for an answer within what the model was trained on
                log.warning("the question (%d tokens) with the image's %d codes makes a %d-token prompt; the model "
                            "was trained on sequences of at most %d: shorten the question, its answer is unreliable",
                            len(self.codec.encode(q)), self.vocab.tokens_per_image, len(p), ml)
        out: list[dict[str, Any] | None] = [None] * len(prompts)
        closed = [i for i, ch in enumerate(choices) if ch]
        if closed:
            probs = answer_probabilities(self.llm, self.vocab, self.codec, [prompts[i] for i in closed], [list(choices[i]) for i in closed])
            for i, p in zip(closed, probs):
                ch = list(choices[i])
                out[i] = {"answer": ch[int(np.argmax(p))], "probabilities": dict(zip(ch, map(float, p)))}
        open_ = [i for i, ch in enumerate(choices) if not ch]
        if open_:
            ids = generate_text(self.llm, self.vocab, [prompts[i] for i in open_], max_new_tokens=16, num_beams=1)
            for i, x in zip(open_, ids):
                out[i] = {"answer": self.codec.decode(x), "probabilities": None}
        return out  # type: ignore[return-value]

    def vqa(self, images, questions: Sequence[str], choices: Sequence[Sequence[str] | None] | None = None) -> list[dict[str, Any]]:
        """CXR + question -> answer; closed questions (with an answer set) also give probabilities."""
        choices = choices if choices is not None else [None] * len(questions)
        return self.vqa_from_codes(self.encode_images(images), questions, choices)

    def _gen(self, overrides: dict[str, Any]):
        import dataclasses

        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config.generate)}
        if unknown:
            raise BundleError(f"unknown generation settings {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(self.config.generate)]}")
        return dataclasses.replace(self.config.generate, **{k: v for k, v in overrides.items() if v is not None})


def read_manifest(path: str | Path | Location) -> tuple[Path, dict[str, Any]]:
    """(the bundle's local folder, its checked manifest); a bundle on a store is copied to the cache once."""
    where = Location.of(path)
    if not (where / MANIFEST).is_file():
        raise BundleError(f"{where} is not a model bundle (no {MANIFEST}); stage 2 writes one at "
                          "runs/<name>/stage2/bundle")
    p = local_dir(where, key_file=MANIFEST)
    mf = p / MANIFEST
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{mf} is not valid JSON ({e}); the bundle is damaged: copy it again or re-run stage 2") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle {p} has format version {manifest.get('format_version')}; this code reads version "
                          f"{FORMAT_VERSION}: load it with the MAViLT version that wrote it (code version "
                          f"{manifest.get('code_version')}) or re-run stage 2 with this one")
    return p, manifest


def load_bundle(path: str | Path | Location, device: str | torch.device | None = None,
                parts: Sequence[str] = LOADABLE) -> Bundle:
    """Load a bundle written by stage 2 (``runs/<name>/stage2/bundle``, on local disk or a URI): all of it, or
    only ``parts`` (of :data:`LOADABLE`), so a server's deployment holds only the model it serves."""
    from mavilt.tokenizer.model import VQGAN

    unknown = sorted(set(parts) - set(LOADABLE))
    if unknown or not parts:
        raise BundleError(f"unknown bundle parts {unknown or list(parts)}: choose among {list(LOADABLE)}")
    p, manifest = read_manifest(path)
    cfg = config_from_dict(manifest["config"], f"the config in {p / MANIFEST}")
    vocab = JointVocab.from_dict(manifest["vocab"])
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = manifest["paths"]
    tokenizer = llm = vqgan = encoder = None
    if LANGUAGE_MODEL in parts:
        tokenizer, llm = _load_llm(p, paths, cfg)
        llm = llm.to(dev).eval()
    if IMAGE_ENCODER in parts or IMAGE_DECODER in parts:
        vqgan = VQGAN.from_pretrained(p / paths["vqgan"]).keep_only(encoder=IMAGE_ENCODER in parts,
                                                                    decoder=IMAGE_DECODER in parts).to(dev).eval()
    if CXR_ENCODER in parts and paths.get("encoder"):
        from mavilt.tokenizer.features import CXREncoder

        encoder = CXREncoder.from_pretrained(p / paths["encoder"]).to(dev).eval()
    return Bundle(path=p, config=cfg, vocab=vocab, image_size=int(manifest["image_size"]), tokenizer=tokenizer, llm=llm,
                  vqgan=vqgan, encoder=encoder, device=dev, manifest=manifest, parts=tuple(parts))


def _load_llm(p: Path, paths: dict[str, Any], cfg: Config) -> tuple[Any, torch.nn.Module]:
    """(text tokenizer, LLM): the full weights, or theta_0 with the LoRA adapter merged in."""
    from mavilt.llm.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(p / paths["tokenizer"])
    if paths.get("llm"):
        from transformers import AutoModelForCausalLM

        return tokenizer, AutoModelForCausalLM.from_pretrained(str(p / paths["llm"]), local_files_only=True)
    from peft import PeftModel

    from mavilt.llm.model import load_theta0_model

    base, _ = load_theta0_model(Theta0Files(p / paths["theta0"]), cfg.llm)
    return tokenizer, PeftModel.from_pretrained(base, str(p / paths["adapter"])).merge_and_unload()


def export_bundle(src: str | Path | Location, dst: str | Path | Location) -> Location:
    """A self-contained copy of a bundle at ``dst`` (a local path or a URI): a LoRA bundle names its base LM by
    path (theta_0), so its adapter is merged into full weights that travel with it; the rest is copied. The
    copy can be moved to another node or a store and served from there."""
    import shutil

    p, manifest = read_manifest(src)
    with tempfile.TemporaryDirectory(prefix="mavilt-export-") as tmp:
        out = Path(tmp)
        paths = dict(manifest["paths"])
        for part in ("vqgan", "encoder", "tokenizer", "llm"):
            if paths.get(part):
                shutil.copytree(p / paths[part], out / part)
        if not paths.get("llm"):
            cfg = config_from_dict(manifest["config"], f"the config in {p / MANIFEST}")
            _, llm = _load_llm(p, paths, cfg)
            llm.save_pretrained(out / "llm")
            paths.update(llm="llm", adapter=None, theta0=None)
        manifest = {**manifest, "paths": paths, "exported_from": Location.of(src).uri,
                    "content_hash": content_hash(out, recursive=True)}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return publish_dir(tmp, dst, MANIFEST)
