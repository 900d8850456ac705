"""`jobs/evaluate.py`: the three tasks of a bundle on one split, side by side with baselines computed on the
same data, with bootstrap 95% confidence intervals.

Reports are scored per study (one image per study, PA preferred, then AP; studies without the scored section
dropped, as R2Gen does); VQA and images per image. Baselines:

- reports: the most frequent training report; the model given another study's image (blind: images
  deranged across the test studies); nearest-neighbour retrieval of a training report by encoder features;
- VQA: the majority answer per question type (from the training split);
- images: real-vs-real FID between two halves of the split; FID of images decoded from uniformly random
  codes; label fidelity of random-code images and of images synthesised from another study's report.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mavilt.config import Config
from mavilt.console import progress
from mavilt.data.labels import OBSERVATIONS
from mavilt.data.shards import images_array, one_image_per_study, read_rows, report_text
from mavilt.errors import ConfigError, DatasetError
from mavilt.eval.clinical import reference_labels
from mavilt.eval.predict import derangement, predict
from mavilt.hashing import config_hash
from mavilt.storage import Location, publish_dir

log = logging.getLogger(__name__)

CE_KEYS = ("f1_micro_14", "f1_macro_14", "f1_micro_5", "f1_macro_5")



# ---- report metrics ------------------------------------------------------------------------------------


def bleu_counts(refs: list[str], hyps: list[str]) -> np.ndarray:
    """Per report (one reference each), the counts pycocoevalcap's corpus BLEU sums: hypothesis length,
    reference length, n-grams guessed (n = 1..4) and n-grams correct (n = 1..4). A bootstrap replicate of
    corpus BLEU is then a sum over resampled rows (:func:`bleu4_from_counts`), not a new n-gram count."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for ref, hyp in zip(refs, hyps):
        scorer += (hyp, [ref])
    return np.array([[c["testlen"], c["reflen"][0], *c["guess"], *c["correct"]] for c in scorer.ctest], dtype=np.float64)


def bleu4_from_counts(counts: np.ndarray) -> float:
    """Corpus BLEU-4 from :func:`bleu_counts` rows: BleuScorer's formula (its smoothing constants, its brevity
    penalty with the closest reference length), so it equals pycocoevalcap's BLEU-4 of the same reports."""
    total = counts.sum(0)
    test_len, ref_len, guess, correct = total[0], total[1], total[2:6], total[6:10]
    bleu = float(np.prod((correct + 1e-15) / (guess + 1e-9)) ** 0.25)
    ratio = (test_len + 1e-15) / (ref_len + 1e-9)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


def _rouge_per_report(refs: list[str], hyps: list[str]) -> np.ndarray:
    """pycocoevalcap's corpus ROUGE-L is the mean of these, so bootstrapping their mean is exact."""
    from pycocoevalcap.rouge.rouge import Rouge

    r = Rouge()
    return np.array([r.calc_score([h], [ref]) for ref, h in zip(refs, hyps)])


def _mean(x) -> float:
    return float(np.mean(x))


def report_metrics(refs: list[str], hyps: list[str], ref_labels: list[dict], cfg: Config) -> dict[str, Any]:
    """NLG metrics, clinical efficacy (with the uncertain policy), and bootstrap CIs of the headline ones."""
    from mavilt.data.labeler import label_reports
    from mavilt.eval.clinical import binarize_labels, clinical_efficacy, f1_from_matrices
    from mavilt.eval.nlg import EMPTY_PLACEHOLDER, normalize_report, score
    from mavilt.eval.stats import bootstrap_ci

    ec = cfg.eval
    hyp_labels = label_reports(hyps)
    out: dict[str, Any] = dict(score(refs, hyps, max_words=ec.max_words))
    ce = clinical_efficacy(ref_labels, hyp_labels, uncertain_policy=ec.uncertain_policy)
    out.update({k: ce[k] for k in ce if k.startswith(("precision_", "recall_", "f1_"))})
    out["per_observation_f1"] = {o: v["f1"] for o, v in ce["per_observation"].items()}
    out["per_observation"] = ce["per_observation"]  # precision, recall, F1 and positives among the references
    y_true = binarize_labels(ref_labels, ec.uncertain_policy)
    y_pred = binarize_labels(hyp_labels, ec.uncertain_policy)
    ci = {}
    for key in CE_KEYS:
        fn = lambda t, p, key=key: f1_from_matrices(t, p)[key]  # noqa: E731
        ci[key] = list(bootstrap_ci(fn, y_true, y_pred, n_boot=ec.bootstrap_samples, seed=ec.seed))[1:]
    n_refs = [normalize_report(r, ec.max_words) for r in refs]
    n_hyps = [normalize_report(h, ec.max_words) or EMPTY_PLACEHOLDER for h in hyps]
    ci["BLEU-4"] = list(bootstrap_ci(bleu4_from_counts, bleu_counts(n_refs, n_hyps), n_boot=ec.nlg_bootstrap_samples,
                                     seed=ec.seed))[1:]
    ci["ROUGE-L"] = list(bootstrap_ci(_mean, _rouge_per_report(n_refs, n_hyps), n_boot=ec.bootstrap_samples, seed=ec.seed))[1:]
    out["ci95"] = ci
    out["hyp_matrix"] = y_pred
    out["ref_matrix"] = y_true
    return out


def paired_f1_diffs(y_true: np.ndarray, a_pred: np.ndarray, b_pred: np.ndarray, cfg: Config) -> dict[str, list[float]]:
    from mavilt.eval.clinical import f1_from_matrices
    from mavilt.eval.stats import paired_bootstrap_diff

    out = {}
    for key in ("f1_micro_14", "f1_micro_5", "f1_macro_14"):
        fn = lambda t, p, key=key: f1_from_matrices(t, p)[key]  # noqa: E731
        out[key] = list(paired_bootstrap_diff(fn, (y_true, a_pred), (y_true, b_pred),
                                              n_boot=cfg.eval.bootstrap_samples, seed=cfg.eval.seed))
    return out


# ---- the job ---------------------------------------------------------------------------------------------


def evaluation_config(bundle_path: str | Path | Location, cfg_overrides: list[str] | dict[str, Any] | None = None
                      ) -> Config:
    """The config an evaluation of the bundle runs with: the bundle's own, with ``cfg_overrides`` applied
    (``key=value`` strings or a nested mapping), checked against the section the bundle was trained to write.
    Reads the bundle's manifest only, not its weights."""
    from mavilt.bundle import read_manifest
    from mavilt.config import config_from_dict

    p, manifest = read_manifest(bundle_path)
    cfg = config_from_dict(manifest["config"], f"the config of the bundle at {p}")
    trained = cfg.stage2.report_section  # what the bundle writes, whatever the overrides say
    if cfg_overrides:
        cfg = cfg.with_overrides(cfg_overrides)
    if cfg.stage2.report_section != trained:
        raise ConfigError(
            f"stage2.report_section={cfg.stage2.report_section} cannot be changed at evaluation: the bundle at "
            f"{bundle_path} was trained to write the {trained} section; leave stage2.report_section as it is and set "
            f"eval.report_section={trained}")
    if cfg.eval.report_section != trained:
        raise ConfigError(
            f"eval.report_section={cfg.eval.report_section}, but the bundle at {bundle_path} was trained to write the "
            f"{trained} section (its stage2.report_section): its reports would be scored against another section. "
            f"Evaluate it with eval.report_section={trained}, or train a bundle with "
            f"stage2.report_section={cfg.eval.report_section}")
    return cfg


def evaluation_settings(cfg: Config) -> dict[str, Any]:
    """A config's evaluation and decoding sections, as overrides of a bundle's own (which are those of the run
    that trained it): what the pipeline and the ablations evaluate a bundle with."""
    d = cfg.to_dict()
    return {"eval": dict(d["eval"]), "generate": dict(d["generate"])}


def evaluation_hash(bundle_path: str | Path | Location, data: str | Path | Location, cfg: Config,
                    judge_checkpoint: str | Path | None = None) -> str:
    """What an evaluation's result depends on: the bundle, the data, the evaluation and decoding settings and
    the judge (a finished evaluation with the same hash need not run again)."""
    return config_hash([str(bundle_path), str(data), cfg.hash("eval", "generate"),
                        *([str(judge_checkpoint)] if judge_checkpoint else [])])


def run_evaluate(bundle_path: str | Path, data: str | Path, out: str | Path,
                 cfg_overrides: list[str] | dict[str, Any] | None = None, split: str | None = None,
                 limit: int | None = None, judge_checkpoint: str | Path | None = None) -> dict[str, Any]:
    """``judge_checkpoint``: a second CXR encoder trained independently of the bundle's phi (the pipeline's judge
    step, or ``jobs/encoder.py`` with another ``encoder.seed``); synthesised images are scored by it. Without
    one they are scored by phi, and the report says that this judge is not independent. ``split`` and
    ``limit`` override ``eval.split`` and ``eval.limit``."""
    from mavilt import load_bundle
    from mavilt.runs import StepOutput, finish

    t0 = time.perf_counter()
    out = Location.of(out)
    extra = {"eval": {k: v for k, v in (("split", split), ("limit", limit)) if v is not None}}
    cfg = evaluation_config(bundle_path, cfg_overrides).with_overrides(extra)
    bundle = load_bundle(bundle_path)
    bundle.config = cfg
    split, limit = cfg.eval.split, cfg.eval.limit
    # Everything is written to a local folder first and published at `out` with result.json last: a reader
    # never takes a half-written evaluation for a finished one, on local disk or on a store.
    with tempfile.TemporaryDirectory(prefix="mavilt-evaluate-") as staging:
        cfg.save(Path(staging) / "config.yaml")
        ev = Evaluation(bundle, Location.of(bundle_path), Location.of(data), Path(staging), cfg, split, limit,
                        judge=load_judge(judge_checkpoint, bundle.device) if judge_checkpoint else None)
        metrics = ev.run()
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        h = evaluation_hash(bundle_path, data, cfg, judge_checkpoint)
        result = finish("evaluate", out, None, metrics, h, folder=staging, picked=evaluate_headline(metrics))
        publish_dir(staging, out, StepOutput.result.relative)
    return result


def evaluate_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's result line: the model's main figure per task (the tables are in metrics.json and
    report.md). Already a headline (a result line read back): returned as it is."""
    if "reports" not in metrics and "images" not in metrics:
        return {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    systems = metrics.get("reports", {}).get("systems", {})
    rep, retrieval = systems.get("model", {}), systems.get("retrieval", {})
    images = metrics.get("images", {})
    fid, fidelity = images.get("fid", {}), images.get("label_fidelity", {})
    picked = {
        "f1_micro_14": rep.get("f1_micro_14"), "f1_macro_14": rep.get("f1_macro_14"), "f1_micro_5": rep.get("f1_micro_5"),
        "BLEU-4": rep.get("BLEU-4"), "METEOR": rep.get("METEOR"), "ROUGE-L": rep.get("ROUGE-L"), "CIDEr": rep.get("CIDEr"),
        "retrieval_f1_micro_14": retrieval.get("f1_micro_14"),
        "vqa_accuracy": metrics.get("vqa", {}).get("model", {}).get("accuracy"),
        "fid": fid.get("synthesized", {}).get("fid"), "fid_real_vs_real": fid.get("real_vs_real", {}).get("fid"),
        "label_fidelity_f1": fidelity.get("synthesized", {}).get("f1"), "label_fidelity_f1_real": fidelity.get("real", {}).get("f1"),
        "psnr": metrics.get("reconstruction", {}).get("psnr"), "ssim": metrics.get("reconstruction", {}).get("ssim"),
    }
    return {k: v for k, v in picked.items() if v is not None}


def load_judge(checkpoint: str | Path, device) -> torch.nn.Module:
    """The judge encoder from an encoder checkpoint (or its ``encoder/`` folder), on ``device``, frozen."""
    from mavilt.checkpoints import EncoderCheckpoint
    from mavilt.storage import local_dir
    from mavilt.tokenizer.features import CXREncoder

    found = EncoderCheckpoint.find_model(checkpoint, "--judge")
    return CXREncoder.from_pretrained(local_dir(found)).to(device).eval().requires_grad_(False)


class Evaluation:
    def __init__(self, bundle, bundle_path: Location, data: Location, out: Path, cfg: Config, split: str,
                 limit: int | None, judge: torch.nn.Module | None = None):
        self.b, self.bundle_path, self.data, self.out, self.cfg = bundle, bundle_path, data, out, cfg
        self.split, self.limit = split, limit
        # Synthesised images are scored by the judge when there is one; phi (the bundle's encoder, which the
        # tokenizer was trained against) otherwise, and the report says so.
        self.judge, self.judge_is_phi = (judge, False) if judge is not None else (bundle.encoder, True)
        self.ec = cfg.eval
        self.section = self.ec.report_section

    # ---- helpers ---------------------------------------------------------------------------------
    def _predict(self, task: str, inputs: list[dict[str, Any]], **overrides) -> list[Any]:
        if task in ("report", "synthesize"):
            # The evaluation's decoding settings travel with the inputs: Ray Data actors load the bundle from its
            # path, with the decoding settings it was saved with.
            overrides = {**dataclasses.asdict(self.cfg.generate), **overrides}
        return predict(task, inputs, bundle=self.b, bundle_path=self.bundle_path, batch_size=self.ec.batch_size,
                       workers=self.ec.workers, overrides=overrides)

    def _images(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        return torch.from_numpy(images_array([r["image"] for r in rows]))

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b.encode_images(images[s : s + 256]) for s in range(0, len(images), 256)])

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b.decode_codes(codes[s : s + 256]) for s in range(0, len(codes), 256)])

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        rows = read_rows(self.data, self.split, limit=self.limit)
        if not rows:
            raise DatasetError(f"split '{self.split}' of {self.data} is empty; evaluate another split (--split)")
        progress(f"evaluate: {len(rows)} images from {self.data} ({self.split})")
        images = self._images(rows)
        codes = self._encode(images)
        index = {r["image_id"]: i for i, r in enumerate(rows)}
        metrics: dict[str, Any] = {"split": self.split, "n_images": len(rows), "report_section": self.section,
                                   "uncertain_policy": self.ec.uncertain_policy}
        metrics["reconstruction"] = self.reconstruction(images)
        metrics["reports"], per_study = self.reports(rows, codes, index)
        metrics["vqa"] = self.vqa(rows, codes)
        metrics["images"] = self.images(rows, images, index)
        self.write_csv(per_study)
        from mavilt.eval.report import write_model_card, write_report_md

        write_report_md(self.out / "report.md", metrics, self.cfg, self.bundle_path, self.data)
        write_model_card(self.out / "model_card.md", metrics, self.cfg, self.b)
        return metrics

    def reconstruction(self, images: torch.Tensor) -> dict[str, Any]:
        from mavilt.eval.figures import ERROR_SCALE, Column, save_grid
        from mavilt.eval.recon import reconstruction_metrics

        phi = self.b.encoder
        m, example = reconstruction_metrics(self.b.vqgan, images, phi, device=self.b.device)
        inputs, recons = (t[:, 0].numpy() for t in example)
        save_grid([[x, r, np.abs(x - r)] for x, r in zip(inputs, recons)],
                  [Column("test image"), Column("VQ-GAN reconstruction"),
                   Column("|image - reconstruction|", cmap="magma", vmax=ERROR_SCALE)],
                  self.out / "reconstructions.png", title=f"Tokenizer reconstruction ({self.split} split)",
                  note=f"error map: absolute difference, colour scale 0 to {ERROR_SCALE} of the intensity range")
        return m

    # ---- reports -----------------------------------------------------------------------------------
    def reports(self, rows, codes, index) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        studies = [r for r in one_image_per_study(rows) if report_text(r, self.section).strip()]
        if not studies:
            return {"n_studies": 0, "note": f"no study has a {self.section} section"}, []
        refs = [report_text(r, self.section) for r in studies]
        ref_labels = [reference_labels(r) for r in studies]
        study_codes = codes[[index[r["image_id"]] for r in studies]]
        progress(f"evaluate: generating {len(studies)} reports (model and blind)")
        model = self._predict("report", [{"codes": c} for c in study_codes.numpy()])
        perm = derangement(len(studies), self.ec.seed)
        blind = self._predict("report", [{"codes": c} for c in study_codes[perm].numpy()])
        train = read_rows(self.data, "train", columns=["study_id", "image_id", "view", "image", "findings", "impression"],
                          limit=self.ec.retrieval_pool)
        train_reports = [report_text(r, self.section) for r in train if report_text(r, self.section).strip()]
        most_frequent = Counter(train_reports).most_common(1)[0][0] if train_reports else ""
        retrieval = self.retrieve(train, studies, index, codes)
        systems = {"model": model, "blind": blind, "most_frequent": [most_frequent] * len(studies), "retrieval": retrieval}
        progress("evaluate: scoring reports")
        res: dict[str, Any] = {"n_studies": len(studies), "systems": {}}
        preds = {}
        for name, hyps in systems.items():
            m = report_metrics(refs, hyps, ref_labels, self.cfg)
            preds[name] = m.pop("hyp_matrix")
            y_true = m.pop("ref_matrix")
            res["systems"][name] = m
        res["model_minus"] = {b: paired_f1_diffs(y_true, preds["model"], preds[b], self.cfg)
                              for b in ("blind", "most_frequent", "retrieval")}
        per_study = [
            {"study_id": r["study_id"], "image_id": r["image_id"], "view": r.get("view"), "reference": ref,
             "generated": g, "blind": bl, "retrieval": rt}
            for r, ref, g, bl, rt in zip(studies, refs, model, blind, retrieval)
        ]
        return res, per_study

    def retrieve(self, train, studies, index, codes) -> list[str]:
        """Nearest training report by cosine similarity of encoder features (the baseline to beat next)."""
        enc = self.b.encoder
        pool = [r for r in train if report_text(r, self.section).strip()]
        if enc is None or not pool:
            return [""] * len(studies)
        from mavilt.eval.fid import compute_features, inhouse_network

        net = inhouse_network(enc)
        f_train = compute_features(net, self._images(pool))
        f_test = compute_features(net, self._images(studies))
        f_train /= np.linalg.norm(f_train, axis=1, keepdims=True) + 1e-12
        f_test /= np.linalg.norm(f_test, axis=1, keepdims=True) + 1e-12
        nearest = (f_test @ f_train.T).argmax(1)
        return [report_text(pool[i], self.section) for i in nearest]

    # ---- VQA -----------------------------------------------------------------------------------------
    def vqa(self, rows, codes) -> dict[str, Any]:
        from mavilt.eval.stats import bootstrap_ci, paired_bootstrap_diff
        from mavilt.eval.vqa import majority_baseline, normalize_answer, vqa_metrics

        items = []
        for i, r in enumerate(rows):
            for q in r.get("vqa") or []:
                items.append({**q, "row": i})
        if not items:
            return {"n": 0, "note": "this split has no VQA items"}
        progress(f"evaluate: answering {len(items)} questions")
        preds = self._predict("vqa", [{"codes": codes[it["row"]].numpy(), "question": it["question"],
                                       "choices": it.get("choices")} for it in items])
        model_items = [{**it, "predicted": p["answer"], "probabilities": p.get("probabilities")} for it, p in zip(items, preds)]
        train_items = [q for r in read_rows(self.data, "train", columns=["vqa"]) for q in (r.get("vqa") or [])]
        base_items = majority_baseline(train_items, items) if train_items else []
        res: dict[str, Any] = {"model": vqa_metrics(model_items)}
        if base_items:
            res["majority_per_type"] = vqa_metrics(base_items)
        correct = lambda its: np.array([normalize_answer(x["predicted"]) == normalize_answer(x["answer"]) for x in its], float)  # noqa: E731
        acc = lambda c: float(np.mean(c))  # noqa: E731
        res["ci95"] = {"model": list(bootstrap_ci(acc, correct(model_items), n_boot=self.ec.bootstrap_samples, seed=self.ec.seed))[1:]}
        if base_items:
            res["ci95"]["majority_per_type"] = list(bootstrap_ci(acc, correct(base_items), n_boot=self.ec.bootstrap_samples, seed=self.ec.seed))[1:]
            res["model_minus_majority"] = list(paired_bootstrap_diff(acc, (correct(model_items),), (correct(base_items),),
                                                                     n_boot=self.ec.bootstrap_samples, seed=self.ec.seed))
        return res

    # ---- images --------------------------------------------------------------------------------------
    def images(self, rows, images: torch.Tensor, index) -> dict[str, Any]:
        from mavilt.eval.fid import fid_report, inhouse_network, load_fid_network
        from mavilt.eval.fidelity import label_fidelity

        studies = [r for r in one_image_per_study(rows) if report_text(r, "both").strip()]
        if self.ec.synth_limit:
            studies = studies[: self.ec.synth_limit]
        if len(studies) < 4:
            return {"note": "too few studies to synthesise images"}
        texts = [report_text(r, self.section) or report_text(r, "both") for r in studies]
        progress(f"evaluate: synthesising {len(studies)} images")
        synth_codes = torch.as_tensor(np.asarray(self._predict("synthesize", [{"text": t} for t in texts]), dtype=np.int64))
        synth = self._decode(synth_codes)
        gen = torch.Generator().manual_seed(self.ec.seed)
        random_codes = torch.randint(0, self.b.vocab.codebook_size, synth_codes.shape, generator=gen)
        random_images = self._decode(random_codes)
        real = images[[index[r["image_id"]] for r in studies]]
        labels = [reference_labels(r) for r in studies]
        res: dict[str, Any] = {"n": len(studies)}
        # FID: every comparison against the same real half B, with the same sample count
        judge = self.judge
        res["judge"] = ("phi, the bundle's CXR encoder (the network the tokenizer was trained against: not an "
                        "independent judge)" if self.judge_is_phi else
                        "the judge, a second CXR encoder trained independently of phi (another seed)")
        if self.ec.fid_network == "inhouse":
            if judge is None:
                return {**res, "note": "no CXR encoder (neither a judge nor the bundle's): FID and label fidelity need one"}
            net = inhouse_network(judge)
            desc = net.description
        else:
            net, desc = load_fid_network(self.ec.fid_network, self.ec.fid_weights, judge)
        half = len(studies) // 2
        a, bh = slice(0, half), slice(half, 2 * half)
        reconstructed = self._decode(self._encode(real))
        res["fid"] = {
            "real_vs_real": fid_report(real[a], real[bh], net, desc),
            "synthesized": fid_report(synth[a], real[bh], net, desc),
            "random_codes": fid_report(random_images[a], real[bh], net, desc),
            "reconstructed": fid_report(reconstructed[a], real[bh], net, desc),
        }
        if judge is not None:
            perm = derangement(len(studies), self.ec.seed + 1)
            fidelity = lambda x: label_fidelity(judge, x, labels, uncertain_policy=self.ec.uncertain_policy,  # noqa: E731
                                                n_boot=self.ec.bootstrap_samples, seed=self.ec.seed)
            # The reconstructions say whether the tokenizer keeps the findings: the bound of any image the LM draws.
            res["label_fidelity"] = {"synthesized": fidelity(synth), "mismatched_reports": fidelity(synth[perm]),
                                     "random_codes": fidelity(random_images), "reconstructed": fidelity(reconstructed),
                                     "real": fidelity(real)}
        self.save_grids(studies, real, synth, labels)
        return res

    def save_grids(self, studies, real, synth, labels) -> None:
        """samples.png: input | reconstruction | synthesised from its report, each row labelled with the study's
        findings; findings.png: one synthesised image per finding (the first test study whose labels have it),
        beside the real image, the finding named on its row (and in findings.txt)."""
        from mavilt.eval.figures import Column, positive_findings, save_grid

        n = min(8, len(studies))
        recon = self._decode(self._encode(real[:n]))
        img = lambda t: t[0].numpy()  # noqa: E731
        save_grid([[img(real[i]), img(recon[i]), img(synth[i])] for i in range(n)],
                  [Column("test image"), Column("VQ-GAN reconstruction"), Column("synthesised from its report")],
                  self.out / "samples.png", title=f"First {n} test studies", row_labels=[
                      positive_findings(labels[i]) for i in range(n)],
                  note="row label: the study's positive findings from its reference report")
        rows_ = []
        names = []
        for o in OBSERVATIONS:
            if o in ("No Finding", "Lung Opacity"):
                continue
            hit = next((i for i, lab in enumerate(labels) if lab.get(o) == 1), None)
            if hit is not None:
                rows_.append([img(real[hit]), img(synth[hit])])
                names.append(o)
        if rows_:
            save_grid(rows_, [Column("real test image"), Column("synthesised from its report")],
                      self.out / "findings.png", title="One study per finding", row_labels=names,
                      note="each row: the first test study whose reference report has the finding")
            (self.out / "findings.txt").write_text("\n".join(f"row {i + 1}: {o}" for i, o in enumerate(names)) + "\n")

    def write_csv(self, per_study: list[dict[str, Any]]) -> None:
        path = self.out / "per_study.csv"
        if not per_study:
            path.write_text("")
            return
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(per_study[0]))
            w.writeheader()
            w.writerows(per_study)


