"""The ``lora-scripts lora`` sub-commands: argument parsing and printing (torch is imported only when one runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _bar(items: Any, desc: str = "", unit: str = "it") -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


def _quiet() -> None:
    from ..cli import quiet_libraries

    quiet_libraries()


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .inspect import inspect_report, render

    report = inspect_report(Path(args.file))
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    _quiet()
    from .ops import convert

    written = convert(Path(args.file), args.to, Path(args.output), Path(args.base) if args.base else None)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .lowrank import parse_dynamic
    from .ops import resize

    if args.rank is None and args.dynamic is None:
        raise ConfigError("resize: give --rank R, --dynamic METHOD=X, or both (--rank then caps the dynamic rank)")
    if args.rank is not None and args.rank < 1:
        raise ConfigError(f"--rank: {args.rank} is not a rank; give a positive integer")
    _quiet()
    report, path = resize(Path(args.file), Path(args.output), args.rank, parse_dynamic(args.dynamic), _bar)
    for name, old, new, result in report if args.verbose else []:
        print(f"  {name}: rank {old} -> {new}, retained energy {result.retained:.6f}, error {result.error:.2e}")
    errors = [c.error for *_, c in report]
    retained = [c.retained for *_, c in report]
    ranks = [n for _, _, n, _ in report]
    print(f"resized {len(report)} modules to rank {min(ranks)}..{max(ranks)}: retained energy min "
          f"{min(retained):.6f}, mean {sum(retained) / len(retained):.6f}; relative error max {max(errors):.2e}")
    print(f"wrote {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    files = [Path(f) for f in args.files]
    ratios = args.ratios if args.ratios is not None else [1.0] * len(files)
    if len(ratios) != len(files):
        raise ConfigError(f"--ratios: {len(ratios)} ratios for {len(files)} files; give one per file")
    _quiet()
    if args.into:
        if args.rank is not None:
            raise ConfigError("--rank is for LoRA + LoRA merges; a merge --into a base model has no rank")
        from .checkpoint import merge_into_base

        path = merge_into_base(files, ratios, Path(args.into), Path(args.output),
                               Path(args.base_config) if args.base_config else None, _bar)
        print(f"wrote {path} (single-file checkpoint, LDM layout)")
        return 0
    if len(files) < 2:
        raise ConfigError("merge: give two or more LoRA files (or --into BASE to merge into a model)")
    from .ops import merge_loras

    cuts, path = merge_loras(files, ratios, Path(args.output), args.rank, _bar)
    if cuts:
        errors = [c.error for c in cuts.values()]
        print(f"merged by SVD to rank {args.rank}: relative error max {max(errors):.2e}, retained energy min "
              f"{min(c.retained for c in cuts.values()):.6f}")
    else:
        print("merged exactly (factors concatenated; each module's rank is the sum)")
    print(f"wrote {path}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    if args.rank < 1 or (args.conv_rank is not None and args.conv_rank < 1):
        raise ConfigError("--rank / --conv-rank: give positive integers")
    _quiet()
    from .ops import extract

    cuts, path = extract(Path(args.base), Path(args.tuned), Path(args.output), args.rank, args.conv_rank,
                         args.min_diff, not args.unet_only, _bar)
    errors = [c.error for c in cuts.values()]
    print(f"extracted {len(cuts)} modules at rank {args.rank}: relative error max {max(errors):.2e}, retained "
          f"energy min {min(c.retained for c in cuts.values()):.6f}")
    print(f"wrote {path}")
    return 0


def add_lora_parser(sub: Any) -> None:
    """Register ``lora-scripts lora inspect|convert|resize|merge|extract``."""
    p = sub.add_parser("lora", help="inspect, convert, resize, merge and extract LoRA files (docs/lora-tools.md)")
    tools = p.add_subparsers(dest="lora_command", required=True)

    t = tools.add_parser("inspect", help="family, rank/alpha, trained parts, metadata and consumers of a LoRA")
    t.add_argument("file", help="a kohya/LyCORIS/diffusers .safetensors LoRA or a PEFT adapter folder")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.set_defaults(func=cmd_inspect)

    t = tools.add_parser("convert", help="write a LoRA in the kohya, diffusers or PEFT layout")
    t.add_argument("file")
    t.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft"])
    t.add_argument("--output", required=True, help="kohya: a .safetensors file; diffusers/peft: a folder")
    t.add_argument("--base", help="the diffusers model folder the LoRA was trained on (module names; default: the "
                   "family's full-size configs)")
    t.set_defaults(func=cmd_convert)

    t = tools.add_parser("resize", help="lower a LoRA's rank by SVD (as sd-scripts' resize_lora)")
    t.add_argument("file")
    t.add_argument("--rank", type=int, help="the new rank (the most, with --dynamic)")
    t.add_argument("--dynamic", metavar="METHOD=X", help="per-module rank: sv_ratio=X, sv_fro=X or sv_cumulative=X")
    t.add_argument("--output", required=True, help="the resized .safetensors (kohya layout)")
    t.add_argument("--verbose", action="store_true", help="print each module's rank and retained energy")
    t.set_defaults(func=cmd_resize)

    t = tools.add_parser("merge", help="LoRAs into a base model (--into), or LoRA + LoRA into one LoRA")
    t.add_argument("files", nargs="+", metavar="FILE")
    t.add_argument("--ratios", type=float, nargs="+", help="one weight per file (default 1 each)")
    t.add_argument("--into", metavar="BASE", help="a diffusers folder or single-file SD 1.x/2.x/SDXL checkpoint: "
                   "write the merged model as one single-file checkpoint")
    t.add_argument("--base-config", help="--into a single file: its base_model_config (config folder or .yaml)")
    t.add_argument("--rank", type=int, help="LoRA + LoRA: SVD-reduce each module to this rank (default: "
                   "concatenate, exact)")
    t.add_argument("--output", required=True, help="the merged .safetensors")
    t.set_defaults(func=cmd_merge)

    t = tools.add_parser("extract", help="a LoRA from the difference of a fine-tuned model and its base")
    t.add_argument("--base", required=True, help="the base model (diffusers folder or single file)")
    t.add_argument("--tuned", required=True, help="the fine-tuned model (same layout as --base)")
    t.add_argument("--rank", type=int, required=True, help="rank of the linear / 1x1 modules")
    t.add_argument("--conv-rank", type=int, help="also extract the 3x3 convs at this rank (LoCon)")
    t.add_argument("--min-diff", type=float, default=1e-6, help="skip modules whose weights differ by at most this")
    t.add_argument("--unet-only", action="store_true", help="leave the text encoders out")
    t.add_argument("--output", required=True, help="the extracted .safetensors (kohya layout)")
    t.set_defaults(func=cmd_extract)
