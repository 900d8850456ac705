"""report.md and the model card, written from the evaluation's metrics."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from mavilt.config import Config


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(point: Any, ci: list[float] | None, digits: int = 3) -> str:
    if ci is None or point is None:
        return _f(point, digits)
    return f"{point:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def verdict(diff: list[float] | None) -> str:
    """From a paired difference [point, low, high]."""
    if not diff:
        return "–"
    point, low, high = diff
    if low > 0:
        return f"ahead by {point:+.3f} [{low:+.3f}, {high:+.3f}]: beyond the CI"
    if high < 0:
        return f"behind by {point:+.3f} [{low:+.3f}, {high:+.3f}]: beyond the CI"
    return f"{point:+.3f} [{low:+.3f}, {high:+.3f}]: within the CI"


SYSTEM_NAMES = {
    "model": "MAViLT (this bundle)",
    "blind": "blind model (another study's image)",
    "most_frequent": "most frequent training report",
    "retrieval": "nearest-neighbour retrieval (encoder features)",
}


def report_section(m: dict[str, Any], lines: list[str]) -> None:
    r = m["reports"]
    lines += ["## Report generation", ""]
    if not r.get("n_studies"):
        lines += [r.get("note", "no studies"), ""]
        return
    lines += [
        f"{r['n_studies']} studies (one image per study: PA, then AP), section **{m['report_section']}**, "
        f"uncertain labels counted as **{m['uncertain_policy']}**. Clinical efficacy: the rule-based CheXpert "
        "labeler (`mavilt.data.labeler`) on the generated report against the study's labels. "
        "Brackets: bootstrap 95% CI over studies.",
        "",
        "| system | F1 micro-14 | F1 macro-14 | F1 micro-5 | F1 macro-5 | BLEU-4 | METEOR | ROUGE-L | CIDEr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in r["systems"].items():
        ci = s.get("ci95", {})
        lines.append(
            f"| {SYSTEM_NAMES.get(name, name)} | {_ci(s['f1_micro_14'], ci.get('f1_micro_14'))} | "
            f"{_ci(s['f1_macro_14'], ci.get('f1_macro_14'))} | {_ci(s['f1_micro_5'], ci.get('f1_micro_5'))} | "
            f"{_ci(s['f1_macro_5'], ci.get('f1_macro_5'))} | {_ci(s['BLEU-4'], ci.get('BLEU-4'))} | {_f(s.get('METEOR'))} | "
            f"{_ci(s['ROUGE-L'], ci.get('ROUGE-L'))} | {_f(s.get('CIDEr'))} |"
        )
    lines += ["", "Paired bootstrap differences (model minus baseline, same resampled studies):", "",
              "| baseline | F1 micro-14 | F1 micro-5 |", "|---|---|---|"]
    for b, d in r.get("model_minus", {}).items():
        lines.append(f"| {SYSTEM_NAMES.get(b, b)} | {verdict(d.get('f1_micro_14'))} | {verdict(d.get('f1_micro_5'))} |")
    per = r["systems"]["model"].get("per_observation", {})
    if per:
        lines += ["", "Per observation (the model's reports; positives: studies whose reference report has it; "
                  "F1 is undefined, shown –, where no reference has it):", "",
                  "| observation | positives | precision | recall | F1 |", "|---|---|---|---|---|"]
        for o, v in per.items():
            defined = v.get("support", 0) > 0
            lines.append(f"| {o} | {v.get('support', 0)} | {_f(v['precision'], 2) if defined else '–'} | "
                         f"{_f(v['recall'], 2) if defined else '–'} | {_f(v['f1'], 2) if defined else '–'} |")
        lines.append("")


def poorly_read(m: dict[str, Any], below: float = 0.5) -> tuple[list[str], list[str]]:
    """Observations the model's reports get wrong (F1 below ``below`` where references have them), as
    "name (F1 x over n positives)", and those the split cannot measure (no positive reference)."""
    per = (m.get("reports", {}).get("systems", {}).get("model", {}) or {}).get("per_observation", {})
    poor = [f"{o} (F1 {v['f1']:.2f} over {v['support']} positives)" for o, v in per.items()
            if v.get("support", 0) > 0 and v["f1"] < below]
    unmeasured = [o for o, v in per.items() if v.get("support", 0) == 0]
    return poor, unmeasured


def vqa_section(m: dict[str, Any], lines: list[str]) -> None:
    v = m["vqa"]
    lines += ["## Visual question answering", ""]
    if not v.get("n", 1) or "model" not in v:
        lines += [v.get("note", "no questions"), ""]
        return
    types = sorted(k.split("/", 1)[1] for k in v["model"] if k.startswith("accuracy/"))
    lines += [f"{v['model']['n']} questions, per image; closed questions scored over their answer set.", "",
              "| system | accuracy | " + " | ".join(types) + " | AUROC yes/no |",
              "|---|---|" + "---|" * len(types) + "---|"]
    for name in ("model", "majority_per_type"):
        if name not in v:
            continue
        s = v[name]
        label = "MAViLT (this bundle)" if name == "model" else "majority answer per question type"
        lines.append(f"| {label} | {_ci(s['accuracy'], v.get('ci95', {}).get(name))} | "
                     + " | ".join(_f(s.get(f"accuracy/{t}")) for t in types) + f" | {_f(s.get('auroc_yes_no'))} |")
    lines += ["", f"Model minus majority (accuracy): {verdict(v.get('model_minus_majority'))}", ""]


def image_section(m: dict[str, Any], lines: list[str]) -> None:
    im = m["images"]
    lines += ["## Report → CXR synthesis", ""]
    if "fid" not in im:
        lines += [im.get("note", "not evaluated"), ""]
        return
    any_fid = next(iter(im["fid"].values()))
    lines += [f"Synthesised images are scored by {im.get('judge', 'the in-house encoder')}. Reports are "
              "scored by the rule-based labeler; the retrieval baseline searches by phi's features.", "",
              f"FID with **{any_fid['network']}**, images {any_fid['resolution']}, "
              f"{any_fid['n_fake']} generated vs {any_fid['n_real']} real (the second half of the studies; "
              "images synthesised from the first half's reports).", "",
              "| images | FID |", "|---|---|"]
    names = {"real_vs_real": "real (first half) vs real (second half)", "synthesized": "synthesised from reports",
             "random_codes": "decoded from uniformly random codes", "reconstructed": "VQ-GAN reconstructions (tokenizer bound)"}
    for k, r in im["fid"].items():
        lines.append(f"| {names.get(k, k)} | {_f(r['fid'], 2)} |")
    lf = im.get("label_fidelity")
    if lf:
        lines += ["", f"Label fidelity: {im.get('judge', 'the in-house encoder')} on generated images against the "
                  "labels of the report that conditioned them (hit rate: share of requested positive findings the encoder "
                  "sees, p > 0.5; precision: share of findings it sees that were requested; F1 of the two, with its "
                  "bootstrap 95% CI over images; AUROC per observation, averaged).", "",
                  "| images | hit rate | precision | F1 | mean AUROC |", "|---|---|---|---|---|"]
        lnames = {"synthesized": "synthesised from the study's report", "mismatched_reports": "synthesised from another study's report",
                  "random_codes": "decoded from random codes",
                  "reconstructed": "VQ-GAN reconstructions of the real images (tokenizer bound)",
                  "real": "the real images (encoder bound)"}
        for k, r in lf.items():
            lines.append(f"| {lnames.get(k, k)} | {_f(r.get('hit_rate'))} | {_f(r.get('precision'))} | {_ci(r.get('f1'), r.get('f1_ci95'))} | "
                         f"{_f(r.get('mean_auroc'))} |")
    lines.append("")


def write_report_md(path: Path, m: dict[str, Any], cfg: Config, bundle: Path, data: Path) -> Path:
    rec = m["reconstruction"]
    lines = [
        "# MAViLT evaluation",
        "",
        f"- bundle: `{bundle}` (preset `{cfg.preset}`)",
        f"- data: `{data}`, split **{m['split']}**, {m['n_images']} images",
        f"- written {_dt.datetime.now().isoformat(timespec='seconds')}",
        "",
    ]
    report_section(m, lines)
    vqa_section(m, lines)
    image_section(m, lines)
    lines += ["## Tokenizer reconstruction", "",
              "| PSNR (dB) | SSIM | L1 | edge error | codebook usage | perplexity |", "|---|---|---|---|---|---|",
              f"| {_f(rec['psnr'], 2)} | {_f(rec['ssim'])} | {_f(rec['l1'], 4)} | {_f(rec['edge_error'], 4)} | "
              f"{_f(rec['usage'])} | {_f(rec['perplexity'], 1)} |", "",
              "Files: `per_study.csv` (every study's reference, generated, blind and retrieved report), "
              "`samples.png` (input | reconstruction | synthesised from its report), `findings.png` (real | synthesised, "
              "one row per finding, names in `findings.txt`), `reconstructions.png`, `metrics.json`, `model_card.md`.", "",
              "Which lever of the model pays, each on and off over seeds: [ablation.md](../../../docs/ablation.md) "
              "(`docs/ablation.md` in the repository; `python jobs/ablation.py` writes it for any run).", ""]
    path.write_text("\n".join(lines))
    return path


def _limits_from_numbers(m: dict[str, Any], bundle) -> list[str]:
    poor, unmeasured = poorly_read(m)
    out = [f"- Trained at {bundle.image_size}x{bundle.image_size} pixels: larger radiographs are resized down to "
           "that, so findings smaller than a few of its pixels are lost before the model sees them."]
    if poor:
        out.append(f"- Reads poorly (report F1 below 0.5 on split `{m['split']}`): " + "; ".join(poor) + ".")
    if unmeasured:
        out.append("- Not measured (no positive reference on this split): " + ", ".join(unmeasured) + ".")
    return out


def write_model_card(path: Path, m: dict[str, Any], cfg: Config, bundle) -> Path:
    r = m["reports"]["systems"]["model"] if m["reports"].get("systems") else {}
    v = m["vqa"].get("model", {})
    lines = [
        "# Model card: MAViLT bundle",
        "",
        "## Intended use",
        "Research on joint chest X-ray / report generation only. **Not for clinical decisions**: outputs can be "
        "fluent and wrong, and the model has not been validated on patients.",
        "",
        "## Model",
        f"- preset `{cfg.preset}`; LLM `{cfg.llm.base}` ({cfg.llm.num_layers} layers, d={cfg.llm.hidden_size} for the tiny "
        f"preset), fine-tuning `{cfg.llm.finetune}`, lambda_reg stage 1 {cfg.stage1.lambda_reg}, stage 2 {cfg.stage2.lambda_reg}",
        f"- image tokenizer: VQ-GAN, {bundle.image_size}x{bundle.image_size}, {bundle.vocab.tokens_per_image} tokens per image, "
        f"codebook {bundle.vocab.codebook_size}",
        "",
        "## Data",
        f"Evaluated on split `{m['split']}` ({m['n_images']} images). The `tiny` preset trains and evaluates on synthetic "
        "phantom CXRs whose findings and report phrasing come from a generator: numbers on it say the system works, "
        "not that it would work on real radiographs.",
        "",
        "## Metrics (see report.md for CIs and baselines)",
        f"- report generation ({m['report_section']}): clinical F1 micro-14 {_f(r.get('f1_micro_14'))}, micro-5 "
        f"{_f(r.get('f1_micro_5'))}, BLEU-4 {_f(r.get('BLEU-4'))}, ROUGE-L {_f(r.get('ROUGE-L'))} "
        f"(uncertain = {m['uncertain_policy']})",
        f"- VQA accuracy {_f(v.get('accuracy'))}",
        "",
        "## Known limits",
        *_limits_from_numbers(m, bundle),
        "- The rule-based labeler that scores clinical efficacy has its own errors; CheXbert-based scores are not "
        "comparable with these.",
        f"- Synthesised images (FID, label fidelity) are scored by {m.get('images', {}).get('judge', 'the in-house encoder')}; "
        "FID values are comparable only within one network, resolution and sample count.",
        "- Synthetic training data: no real anatomy variation, no real-world artefacts, no demographics.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path
