"""The `iota` subcommands for the model and its data: baseline, eval, checkpoint, export, generate, data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from iota.cli.common import add_run_options, run_overrides, write_report
from iota.config import OrchestratorSettings, RunSettings
from iota.config.settings import load


def cmd_baseline(args: argparse.Namespace) -> int:
    from iota.train.baseline import train_baseline
    from iota.train.run import build_run

    run = build_run(load(RunSettings, **run_overrides(args)))
    report = train_baseline(
        run, args.tokens, replicas=args.replicas, device=args.device, bf16=args.bf16, threads=args.threads
    )
    print(
        f"baseline: {report['tokens_trained']} tokens in {report['wall_seconds']:.1f} s "
        f"({report['tokens_per_second']:.0f} tok/s); final loss {report['final_loss']:.3f}, "
        f"held-out {report['eval_loss']:.3f}, unigram entropy {report['unigram_entropy']:.3f}"
    )
    write_report(report, args.report)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from iota.checkpoint import eval_command

    settings = load(RunSettings)
    report = eval_command(
        Path(args.checkpoint),
        settings.data_dir,
        args.samples or settings.heldout_samples,
        Path(args.report) if args.report else None,
    )
    print(
        f"held-out loss {report['eval_loss']:.4f} on {report['n_samples']} samples (epoch {report['epoch']})"
    )
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Pull a published checkpoint from the run's bucket into a local directory (the operator's settings)."""
    from iota.checkpoint import find_prepared, latest_epoch, pull_checkpoint
    from iota.orchestrator.assembly import make_store

    settings = load(OrchestratorSettings)
    store, _ = make_store(settings)
    epoch = latest_epoch(store, settings.run_id) if args.epoch is None else args.epoch
    if epoch is None:
        print(f"run {settings.run_id} has no published checkpoint in its bucket")
        return 1
    manifest = json.loads(store.get(f"runs/{settings.run_id}/checkpoints/{epoch}/manifest.json"))
    try:
        tokenizer_dir = find_prepared(settings.data_dir, manifest["data"])
    except ValueError as error:
        print(f"note: no tokenizer attached ({error}); eval works, export and generate need it")
        tokenizer_dir = None
    out = pull_checkpoint(store, settings.run_id, epoch, Path(args.out), tokenizer_dir=tokenizer_dir)
    print(f"checkpoint {epoch} of run {settings.run_id} written to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from iota.checkpoint import export_hf, export_native

    out = (export_hf if args.format == "hf" else export_native)(Path(args.checkpoint), Path(args.out))
    print(f"exported to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from iota.checkpoint import generate

    # The prompt, then what the model wrote after it: the continuation alone often starts mid-sentence.
    print(
        args.prompt
        + generate(Path(args.checkpoint), args.prompt, args.max_new_tokens, args.temperature, args.seed)
    )
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from iota.data import prepare_command

    out = prepare_command([Path(p) for p in args.paths], args.tokenizer, args.vocab_size, Path(args.out))
    print(f"prepared {out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("baseline", help="train the whole model in one process on the run's samples")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--report", default=None)
    p.add_argument(
        "--replicas", type=int, default=1, help="global batch of this many replicas per inner step"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--threads", type=int, default=0)
    add_run_options(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("eval", help="held-out loss of a checkpoint directory")
    p.add_argument("checkpoint")
    p.add_argument("--report", default=None)
    p.add_argument("--samples", type=int, default=0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "checkpoint", help="`iota checkpoint pull --out DIR`: a checkpoint from the run's bucket"
    )
    p.add_argument("action", choices=["pull"])
    p.add_argument("--epoch", type=int, default=None, help="default: the latest complete one")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("export", help="export a checkpoint (hf: transformers LlamaForCausalLM)")
    p.add_argument("checkpoint")
    p.add_argument("--format", choices=["hf", "native"], default="hf")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="continue a prompt with a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="`iota data prepare PATHS... --out DIR`: tokenize a corpus into shards")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("paths", nargs="*", help=".txt/.jsonl/.parquet files or folders; none: the KJV Bible")
    p.add_argument("--tokenizer", choices=["bpe", "llama3"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_data)
