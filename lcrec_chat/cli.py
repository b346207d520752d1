"""One command line: `python -m lcrec_chat <stage> --config configs/ml-100k.yaml [--set key=value ...]`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import typing

from .config import ChatConfig, ConfigError, load_config

COMMANDS = {
    "prepare": "load the dataset, split it leave-one-out, build the SQLite catalogue",
    "index": "embed item texts, train the RQ-VAE, assign conflict-free item codes",
    "train": "tune the backbone (LoRA/QLoRA) on the six alignment tasks",
    "baselines": "fit and score the classic baselines (Popularity, SASRec, GRU4Rec, text kNN) on the run's split",
    "methods": "train and score the LLM methods beside LC-Rec (CLLM4Rec, CoLLM) on the run's split",
    "evaluate": "full-ranking evaluation of the tuned model beside the baselines",
    "pipeline": "run prepare, index, train, baselines, methods and evaluate in order (unchanged stages are skipped)",
    "serve": "start the Gradio chat app on a run folder",
    "export": "copy a run's small servable artifacts (adapter, codes, catalogue, metrics...) to --to",
}
EXAMPLES = {
    "prepare": "python -m lcrec_chat prepare --config configs/ml-100k.yaml",
    "index": "python -m lcrec_chat index --config configs/ml-100k.yaml",
    "train": "python -m lcrec_chat train --config configs/ml-100k.yaml --set train.max_minutes=15",
    "baselines": "OMP_NUM_THREADS=1 python -m lcrec_chat baselines --config configs/ml-100k.yaml",
    "methods": "python -m lcrec_chat methods --config configs/ml-100k.yaml --set methods.run=[cllm4rec]",
    "evaluate": "python -m lcrec_chat evaluate --config configs/ml-100k.yaml --set eval.max_users=200",
    "pipeline": "python -m lcrec_chat pipeline --config configs/ml-100k.yaml",
    "serve": "python -m lcrec_chat serve --config configs/ml-100k.yaml --set run_dir=models/ml-100k --method cllm4rec",
    "export": "python -m lcrec_chat export --config configs/ml-100k.yaml --to models/ml-100k",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lcrec_chat", description="LC-Rec conversational recommender")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="stage")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}.\nexample: {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML preset (configs/*.yaml); defaults apply where it is silent")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one setting, e.g. --set train.lr=1e-4 (repeatable; beats the YAML)")
        p.add_argument("--force", action="store_true", help="rerun even if inputs and config are unchanged")
        if name == "serve":
            p.add_argument("--host", help="interface to bind (default 127.0.0.1: this machine only)")
            p.add_argument("--port", type=int)
            p.add_argument("--share", action="store_true", help="ask Gradio for a public share link")
            p.add_argument("--method", choices=typing.get_args(typing.get_type_hints(ChatConfig)["method"]),
                           help="the recommender the app starts with (default chat.method: lcrec); the page can "
                                "switch to any other the run folder has")
        if name == "export":
            p.add_argument("--to", required=True, help="folder to write (a model card already there is kept)")
    return parser


def run_stage(stage: str, cfg, force: bool) -> dict:
    from . import stages
    if stage == "pipeline":
        return {name: run_stage(name, cfg, force)
                for name in ("prepare", "index", "train", "baselines", "methods", "evaluate")}
    return getattr(stages, stage)(cfg, force=force)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.stage == "serve":
        from .ui import serve
        if args.host:
            cfg.chat.host = args.host
        if args.port:
            cfg.chat.port = args.port
        cfg.chat.share = cfg.chat.share or args.share
        if args.method:
            cfg.chat.method = args.method
        serve(cfg)
        return 0
    try:
        if args.stage == "export":
            from .stages import export
            result = export(cfg, args.to)
        else:
            result = run_stage(args.stage, cfg, args.force)
    except (FileNotFoundError, ValueError) as e:
        print(f"{args.stage} failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1, default=str))
    return 0
