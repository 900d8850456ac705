"""Inference on a model bundle from the command line: ``python -m mavilt report|synthesize|vqa ...``.

Examples::

    python -m mavilt report chest.png study.dcm --bundle runs/demo/stage2/bundle
    python -m mavilt report *.png --bundle BUNDLE --json --beams 3 > reports.jsonl
    python -m mavilt synthesize "Moderate cardiomegaly. Small left pleural effusion." -o cxr.png --bundle BUNDLE
    python -m mavilt synthesize "No acute findings." -o out.png --num 4 --cfg-scale 3 --bundle BUNDLE  # out_0.png ...
    python -m mavilt vqa chest.png "Is there a pleural effusion?" --choices yes,no --bundle BUNDLE
    python -m mavilt export runs/demo/stage2/bundle s3://models/mavilt-demo  # self-contained, to serve elsewhere

Images: PNG, JPEG (8- or 16-bit) or DICOM, resized with the aspect kept to the bundle's size. Nothing from a
DICOM header is printed. Generation goes through the ``Bundle`` methods, the same code the server runs.
Results go to stdout; errors a user can fix print one line to stderr and exit with status 2. ``report`` is a
batch tool: an input it cannot read is skipped with its reason (a line on stderr; with --json also a
``{"path", "skipped"}`` line on stdout), the others are answered, and the exit status is 3. Inputs are checked
before the bundle loads, so a wrong file fails in well under a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from mavilt.console import quiet_environment, quiet_libraries
from mavilt.errors import MavilError

log = logging.getLogger("mavilt.main")

EXIT_USER_ERROR = 2
EXIT_SOME_SKIPPED = 3  # report: some inputs were skipped (each named on stderr), the others answered
# The bundle's manifest file (mavilt.bundle.MANIFEST), named here so bad paths fail before torch is imported.
MANIFEST_NAME = "mavilt.json"


class CLIError(MavilError):
    """A problem with what the user passed: printed as one line, exit status 2."""


# ---- arguments ------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--bundle", required=True, metavar="PATH",
                   help="model bundle folder (has mavilt.json; stage 2 writes one at runs/<name>/stage2/bundle)")
    g.add_argument("--device", default="auto", metavar="{auto,cpu,cuda,cuda:N}",
                   help="where to run the model (default: cuda when available, else cpu)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of plain text")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr, and show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    from mavilt import __version__

    doc = (__doc__ or "").split("Examples::")
    parser = argparse.ArgumentParser(
        prog="python -m mavilt",
        description="MAViLT inference on a model bundle: chest X-ray -> report, report -> chest X-ray, "
                    "chest X-ray + question -> answer.",
        epilog="examples:" + doc[1].split("\n\nImages:")[0] if len(doc) > 1 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mavilt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{report,synthesize,vqa,export}")

    r = sub.add_parser("report", help="write a report for each image",
                       description="CXR -> report text, one per image: `path<TAB>report` lines, or JSON lines "
                                   "{\"path\", \"report\"} with --json.")
    r.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG or DICOM files")
    r.add_argument("--section", choices=("findings", "impression", "both"),
                   help="report section to write (default: the bundle's stage-2 setting)")
    r.add_argument("--beams", type=int, metavar="N", help="beam width (default: the bundle's generate.num_beams)")
    r.add_argument("--max-new-tokens", type=int, metavar="N", help="report length limit in tokens")
    r.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward pass (default: 8)")
    _common(r)

    s = sub.add_parser("synthesize", help="generate a chest X-ray from report text",
                       description="Report text -> chest X-ray PNG(s) at the bundle's image size. With --num K > 1 "
                                   "writes OUT_0.png ... OUT_{K-1}.png. Prints the paths written.")
    s.add_argument("text", metavar="TEXT", help="the report (findings) to draw")
    s.add_argument("-o", "--output", required=True, metavar="OUT.png", help="output PNG path")
    s.add_argument("--cfg-scale", type=float, metavar="S", help="classifier-free guidance scale (1 = off)")
    s.add_argument("--seed", type=int, metavar="N", help="sampling seed (default: the bundle's generate.seed)")
    s.add_argument("--num", type=int, default=1, metavar="K", help="number of images (default: 1)")
    s.add_argument("--temperature", type=float, metavar="T", help="image sampling temperature (0 = greedy)")
    s.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely codes (0 = all)")
    s.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="PNG bit depth (default: 8)")
    _common(s)

    q = sub.add_parser("vqa", help="answer a question about an image",
                       description="CXR + question -> answer. With --choices the answers are scored over that set "
                                   "and their probabilities printed (`answer` then `choice<TAB>probability` lines); "
                                   "without, the answer is decoded as free text.")
    q.add_argument("image", metavar="IMAGE", help="PNG, JPEG or DICOM file")
    q.add_argument("question", metavar="QUESTION", help="the question, e.g. \"Is there a pleural effusion?\"")
    q.add_argument("--choices", metavar="A,B,...", help="closed answer set, comma-separated (e.g. yes,no)")
    _common(q)

    e = sub.add_parser("export", help="copy a bundle self-contained (to serve it on another node or from a store)",
                       description="Copy a bundle to DEST (a folder or a URI such as s3://bucket/prefix) so that it "
                                   "needs nothing outside itself: a LoRA bundle's adapter is merged into full "
                                   "weights (its theta_0 names the base LM by a local path). Prints DEST.")
    e.add_argument("bundle", metavar="BUNDLE", help="the model bundle (runs/<name>/stage2/bundle)")
    e.add_argument("dest", metavar="DEST", help="where the copy goes (replaced if it holds a bundle)")
    e.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr, and show tracebacks")
    parser.set_defaults(subcommand_parsers={"report": r, "synthesize": s, "vqa": q, "export": e})
    return parser


# ---- helpers --------------------------------------------------------------------------------------------


def _check_inputs(paths: Sequence[str]) -> list[Path]:
    """Every input must be readable (vqa's one image): the first problem is the error."""
    good, skipped = _screen_inputs(paths)
    if skipped:
        raise CLIError(skipped[0][1])
    return good


def _screen_inputs(paths: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The inputs that are PNG, JPEG or DICOM files by their first bytes, and ``(input, reason)`` for the rest;
    cheap (132 bytes a file), so it runs before the bundle loads."""
    from mavilt.data.images import image_format

    good, skipped = [], []
    for s in paths:
        p = Path(s)
        if not p.exists():
            skipped.append((s, f"image file not found: {s}"))
        elif not p.is_file():
            skipped.append((s, f"not a file: {s} (pass PNG, JPEG or DICOM files)"))
        else:
            try:
                with open(p, "rb") as f:
                    head = f.read(132)
            except OSError as e:
                skipped.append((s, f"cannot read {s}: {e.strerror or type(e).__name__}"))
                continue
            if image_format(head) is None:
                skipped.append((s, f"{s} is not a PNG, JPEG or DICOM image ({_starts_with(head)})"))
            else:
                good.append(p)
    return good, skipped


def _starts_with(head: bytes) -> str:
    if not head:
        return "it is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c.isspace() for c in text):
        return "it starts with text"
    return f"it starts with bytes {head[:4].hex(' ')}"


def _device(spec: str):
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return None  # load_bundle picks cuda when available
    if not re.fullmatch(r"cpu|cuda(:\d+)?", spec):
        raise CLIError(f"--device {spec}: use auto, cpu, cuda or cuda:N")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return spec


def _check_bundle(path: str):
    from mavilt.errors import MavilError
    from mavilt.storage import Location

    try:
        p = Location.of(path)
        found = p.is_dir()
    except MavilError as e:
        raise CLIError(f"--bundle {path}: {e}") from None
    if not found:
        raise CLIError(f"bundle folder not found: {path}")
    if not (p / MANIFEST_NAME).is_file():
        raise CLIError(f"{path} is not a model bundle (no {MANIFEST_NAME}); stage 2 writes one at "
                       "runs/<name>/stage2/bundle")
    return p


def _load(args: argparse.Namespace):
    p = _check_bundle(args.bundle)
    device = _device(args.device)
    quiet_libraries(verbose=args.verbose)
    try:
        from mavilt.bundle import load_bundle

        return load_bundle(p, device=device)
    except Exception as e:  # noqa: BLE001 - a broken bundle is the user's to fix: one line, traceback with -v
        if args.verbose:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"cannot load the model bundle at {args.bundle}: {first} (run with -v for details)") from None


def _read(paths: Sequence[Path], size: int) -> list:
    images, skipped = _read_each(paths, size)
    if skipped:
        raise CLIError(skipped[0][1])
    return [px for _, px in images]


def _read_each(paths: Sequence[Path], size: int) -> tuple[list[tuple[Path, Any]], list[tuple[str, str]]]:
    """``(path, pixels)`` for each image that decodes, ``(input, reason)`` for the others."""
    from mavilt.data.dicom import read_image_any
    from mavilt.data.images import SkipRecord

    images, skipped = [], []
    for p in paths:
        try:
            px, _view = read_image_any(p, size)
        except SkipRecord as e:
            # Fixed reasons only: nothing from a DICOM header can reach the message.
            skipped.append((str(p), f"cannot read image {p}: {e.reason}"))
            continue
        images.append((p, px))
        _say_if_resized(p, size)
    return images, skipped


def _say_if_resized(path: Path, size: int) -> None:
    """With -v: an image far from the bundle's size is fine to resize, but say so (findings smaller than a few
    of the bundle's pixels are lost on the way)."""
    if not log.isEnabledFor(logging.INFO):
        return
    try:
        from mavilt.data.images import image_format

        with open(path, "rb") as f:
            kind = image_format(f.read(132))
        if kind == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            h, w = int(ds.Rows), int(ds.Columns)  # numbers only: nothing else of the header is read out
        else:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
    except Exception:  # noqa: BLE001 - a detail for -v only
        return
    if max(h, w) >= 4 * size:
        log.info("%s is %dx%d: resized to the bundle's %dx%d (%.0fx smaller)", path, w, h, size, size, max(h, w) / size)


def _report_skipped(args: argparse.Namespace, skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        print(f"mavilt {args.command}: skipped: {reason}", file=sys.stderr, flush=True)
        if args.json:
            _emit({"path": path, "skipped": reason})


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


# ---- commands -------------------------------------------------------------------------------------------


def _request(cls, values: dict[str, Any], flags: dict[str, str]):
    """The same request checks as the server's (:mod:`mavilt.serving.requests`), named by the CLI's flags."""
    from mavilt.serving.requests import RequestError, RequestLimits

    try:
        # One person's command line: as many images as asked for, the server's other limits.
        return cls.parse(values, RequestLimits(max_images=10_000))
    except RequestError as e:
        flag = flags.get(e.field or "")
        raise CLIError(f"{flag}: {e}" if flag else str(e)) from None


def cmd_report(args: argparse.Namespace) -> int:
    from mavilt.serving.requests import ReportRequest

    req = _request(ReportRequest, {"section": args.section, "num_beams": args.beams,
                                   "max_new_tokens": args.max_new_tokens},
                   {"section": "--section", "num_beams": "--beams", "max_new_tokens": "--max-new-tokens"})
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths, skipped = _screen_inputs(args.images)
    if not paths:
        raise CLIError(skipped[0][1] if len(skipped) == 1 else
                       f"none of the {len(skipped)} inputs is a readable image; the first: {skipped[0][1]}")
    _check_bundle(args.bundle)
    _report_skipped(args, skipped)
    bundle = _load(args)
    images, unreadable = _read_each(paths, bundle.image_size)
    _report_skipped(args, unreadable)
    for s in range(0, len(images), args.batch_size):
        chunk = images[s : s + args.batch_size]
        reports = bundle.report([px for _, px in chunk], **req.settings())
        for (p, _), rep in zip(chunk, reports):
            if args.json:
                _emit({"path": str(p), "report": rep})
            else:
                print(f"{p}\t{_one_line(rep)}", flush=True)
    return EXIT_SOME_SKIPPED if skipped or unreadable else 0


def _output_paths(output: str, num: int) -> list[Path]:
    """The files to write, checked before the bundle loads (a wrong path fails at once, not after the model ran)."""
    import os

    out = Path(output)
    if out.suffix.lower() != ".png":
        raise CLIError(f"-o {output}: the output must be a .png file")
    if out.exists() and out.is_dir():
        raise CLIError(f"-o {output} is a folder; give a file name ending in .png")
    existing = next(p for p in [out.parent.absolute(), *out.parent.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise CLIError(f"-o {output}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise CLIError(f"-o {output}: cannot write there (no permission in {existing}); choose another path")
    if num == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(num)]


def cmd_synthesize(args: argparse.Namespace) -> None:
    from mavilt.data.images import encode_png
    from mavilt.serving.requests import SynthesizeRequest

    req = _request(SynthesizeRequest, {"text": args.text, "seed": args.seed, "cfg_scale": args.cfg_scale,
                                       "image_temperature": args.temperature, "top_k": args.top_k,
                                       "num_images": args.num},
                   {"text": "the report text", "seed": "--seed", "cfg_scale": "--cfg-scale",
                    "image_temperature": "--temperature", "top_k": "--top-k", "num_images": "--num"})
    outs = _output_paths(args.output, args.num)
    _check_bundle(args.bundle)
    bundle = _load(args)
    images = bundle.synthesize([req.text] * req.num_images, req.row_seeds(bundle.config.generate.seed),
                               **req.settings())
    for path, img in zip(outs, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(img[0].numpy(), bit_depth=args.bit_depth))
        if args.json:
            _emit({"path": str(path), "image_size": bundle.image_size})
        else:
            print(path, flush=True)


def cmd_vqa(args: argparse.Namespace) -> None:
    from mavilt.serving.requests import VQARequest

    req = _request(VQARequest, {"question": args.question, "choices": args.choices},
                   {"question": "the question", "choices": "--choices"})
    paths = _check_inputs([args.image])
    _check_bundle(args.bundle)
    bundle = _load(args)
    images = _read(paths, bundle.image_size)
    res = bundle.vqa(images, [req.question], [list(req.choices) if req.choices else None])[0]
    if args.json:
        _emit({"path": str(paths[0]), "question": args.question, "answer": res["answer"],
               "probabilities": res.get("probabilities")})
        return
    print(_one_line(res["answer"]), flush=True)
    for c, p in (res.get("probabilities") or {}).items():
        print(f"{c}\t{p:.4f}", flush=True)


def cmd_export(args: argparse.Namespace) -> None:
    from mavilt.bundle import export_bundle
    from mavilt.storage import Location

    src = _check_bundle(args.bundle)
    try:
        dest = Location.of(args.dest)
    except MavilError as e:
        raise CLIError(f"DEST {args.dest}: {e}") from None
    if dest.uri.rstrip("/") == src.uri.rstrip("/"):
        raise CLIError(f"DEST {args.dest} is the bundle itself: give another folder or URI")
    quiet_libraries(verbose=args.verbose)
    print(export_bundle(src, dest).uri, flush=True)


COMMANDS = {"report": cmd_report, "synthesize": cmd_synthesize, "vqa": cmd_vqa, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the subcommand's own usage, not the top-level one
        (args.subcommand_parsers.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # -v: the project's own detail (INFO); libraries keep to their warnings (no config dumps, no HTTP lines).
    logging.getLogger("mavilt").setLevel(logging.INFO if args.verbose else logging.WARNING)
    quiet_environment(verbose=args.verbose, offline=True)
    try:
        status = COMMANDS[args.command](args) or 0
    except CLIError as e:
        return _fail(args, e)
    except BrokenPipeError:  # `... | head`: stop quietly
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        return 130
    except MavilError as e:  # e.g. an unknown generation setting
        return _fail(args, e)
    return status


def _fail(args: argparse.Namespace, e: BaseException) -> int:
    if args.verbose:
        log.error("traceback", exc_info=e)
    print(f"mavilt {args.command}: error: {e}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
