"""`tensorar finetune`: fine-tune a LlamaGen checkpoint as a TensorAR model on precomputed codes.

    tensorar finetune --model c2i_B_256 --codes /data/imagenet_codes --window 4 --out runs/b256
    torchrun --nproc_per_node 8 -m tensorar_plugin.cli finetune --model c2i_L_384 --image-size 384 ...

The codes folder has LlamaGen's layout (`extract_codes_c2i.py`, or `tensorar tokenize IMAGES --out DIR`).
The run writes `metrics.jsonl`, `checkpoint-<step>/` folders and the final model to `<out>/final`
(load it with `TensorARWrapper.from_pretrained(path, load_llamagen(...))`).
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
from typing import Any

from .sample import add_checkpoint_arguments

__all__ = ["register", "run", "parse_overrides"]

#: TensorAR settings with flags. The flags default to argparse.SUPPRESS, so only given ones reach the wrapper
#: (a fresh model takes the wrapper's own defaults for the others) and --init-from can tell a given flag
#: from a default: the saved model's settings apply, and a flag given with a different value is an error.
TENSORAR_FLAGS = ("noise_schedule", "max_noise", "encoder_depth", "decoder_depth", "slot_weights", "draft_source")


#: TrainConfig fields and the flags that set them, so that a refused value is reported under its flag
CONFIG_FLAGS = {
    "max_steps": "--steps", "batch_size": "--batch-size", "grad_accum_steps": "--grad-accum", "lr": "--lr",
    "warmup_steps": "--warmup", "weight_decay": "--weight-decay", "betas": "--beta1/--beta2",
    "grad_clip": "--grad-clip", "ema_decay": "--ema", "log_every": "--log-every", "ckpt_every": "--save-every",
    "keep_checkpoints": "--keep-checkpoints", "num_workers": "--num-workers", "device": "--device",
    "out_dir": "--out", "seed": "--seed",
}


def flag_error(error: ValueError, *, anywhere: bool = False) -> ValueError:
    """A TrainConfig error (``"max_steps must be ..."``) reworded under its flag (``"--steps must be ..."``).

    Only a leading field name is replaced, unless `anywhere` (for TrainConfig's own messages, which name
    fields and values only, not paths that could contain a field's name).
    """
    text = str(error)
    field_name, _, rest = text.partition(" ")
    if field_name in CONFIG_FLAGS:
        text = f"{CONFIG_FLAGS[field_name]} {rest}"
    if anywhere:  # a field named later in the message: "... divisible by grad_accum_steps"
        for name, flag in CONFIG_FLAGS.items():
            if "_" not in name:  # "device", "lr": words that messages use in their plain sense too
                continue
            text = re.sub(rf"(?<![-\w]){name}\b", flag, text)
    return ValueError(text)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["n_head=4", "model_type=c2i"]` -> `{"n_head": 4, "model_type": "c2i"}` (Python literals, else strings)."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-config expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()
    return overrides


def check_saved_settings(saved: dict[str, Any], given: dict[str, Any], source: str) -> None:
    """A model loaded with --init-from keeps its saved TensorAR settings: refuse flags that say otherwise
    (ignoring them silently would train something other than what the command line reads)."""
    clashes = [f"--{name.replace('_', '-')} {value!r} (saved: {saved.get(name)!r})"
               for name, value in given.items() if saved.get(name) != value]
    if clashes:
        raise ValueError(f"--init-from {source} keeps the saved model's TensorAR settings, but the command line "
                         f"asks for {', '.join(clashes)}; drop these flags or start a fresh model")


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except `None` and `False` ones: "(default: None)" says nothing; the help says what unset does."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _optional_bool(text: str) -> bool | None:
    value = text.lower()
    if value in ("auto", "none"):
        return None
    if value in ("yes", "true", "1"):
        return True
    if value in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, yes or no, got {text!r}")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..noise import ADAPTIVE, SCHEDULES
    from ..train import LR_SCHEDULES, PRECISIONS

    parser = subparsers.add_parser(
        "finetune", help="fine-tune a LlamaGen checkpoint into a TensorAR model on precomputed codes",
        description="Fine-tune a LlamaGen GPT as a TensorAR (next-tensor prediction) model on precomputed VQ "
                    "codes. Works on one GPU/CPU and under torchrun (DDP, or FSDP with --fsdp). Defaults follow "
                    "LlamaGen's c2i training recipe.",
        formatter_class=_DefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=True,
                       help="LlamaGen checkpoint: a registry name (e.g. c2i_B_256, downloaded from the Hugging Face "
                            "Hub) or a local .pt / .safetensors file")
    model.add_argument("--image-size", type=int, default=None,
                       help="image size the codes were extracted at (sets the token grid: image_size // 16 per "
                            "side); default: the checkpoint's")
    add_checkpoint_arguments(model)
    model.add_argument("--init-from", default=None,
                       help="start from a saved TensorAR model (a save_pretrained folder) instead of fresh TensorAR "
                            "parts")

    tensorar = parser.add_argument_group("TensorAR", "with --init-from the saved model's settings apply: "
                                                     "--freeze-backbone still does, other flags must match them")
    tensorar.add_argument("--window", type=int, default=4, help="tokens per predicted tensor (k)")
    tensorar.add_argument("--noise-schedule", default=argparse.SUPPRESS, choices=sorted([*SCHEDULES, ADAPTIVE]),
                          help="how the draft-slot noise grows across the window (default exponential; adaptive: "
                               "follows the model's own draft accuracy)")
    tensorar.add_argument("--max-noise", type=float, default=argparse.SUPPRESS,
                          help="replacement probability of the last draft slot (default 1.0)")
    tensorar.add_argument("--encoder-depth", type=int, default=argparse.SUPPRESS,
                          help="blocks of the tensor encoder (default 1)")
    tensorar.add_argument("--decoder-depth", type=int, default=argparse.SUPPRESS,
                          help="blocks of the tensor decoder (default 1)")
    tensorar.add_argument("--slot-weights", type=float, nargs="+", default=argparse.SUPPRESS, metavar="W",
                          help="loss weight of each of the --window slots (default uniform; for small models or "
                               "short runs docs/benchmarks.md found 1 0.1 0.1 0.1 better)")
    tensorar.add_argument("--draft-source", default=argparse.SUPPRESS, choices=("noise", "model"),
                          help="training drafts: noised clean tokens (default, the paper) or samples from a "
                               "gradient-free pass of the model (ours)")
    tensorar.add_argument("--freeze-backbone", action="store_true",
                          help="train only the TensorAR parts (checkpoints then hold only those, adapter-style)")

    data = parser.add_argument_group("data")
    data.add_argument("--codes", required=True, nargs="+", metavar="DIR",
                      help="folder with <name>_codes/ and <name>_labels/ (LlamaGen's extract_codes_c2i.py layout), "
                           "or the <name>_codes folder itself; several folders of the same images (e.g. ten crops "
                           "at crop ranges 1.1 and 1.05, LlamaGen's recipe): each item reads one, chosen uniformly")
    data.add_argument("--num-workers", type=int, default=None,
                      help="data-loader worker processes per GPU (default: 4, at most one per CPU core)")
    data.add_argument("--no-augment", action="store_true",
                      help="always use the first stored augmentation instead of a random one")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=10_000, help="optimizer steps")
    optim.add_argument("--batch-size", type=int, default=256,
                       help="global batch per optimizer step, over all GPUs and accumulation steps (LlamaGen: 256)")
    optim.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps per optimizer step")
    optim.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (LlamaGen uses none)")
    optim.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,
                       help="learning rate after warm-up")
    optim.add_argument("--weight-decay", type=float, default=0.05,
                       help="AdamW weight decay on parameters with >= 2 dims (LlamaGen)")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 disables clipping)")
    optim.add_argument("--precision", default="bf16", choices=PRECISIONS,
                       help="bf16 autocast (float32 weights) or plain float32")
    optim.add_argument("--ema", type=float, default=None, metavar="DECAY",
                       help="keep an EMA of the weights with this decay (e.g. 0.9999), saved in ema/ folders")
    optim.add_argument("--fsdp", action="store_true",
                       help="shard the model with FSDP (under torchrun) for models that do not fit one GPU")
    optim.add_argument("--compile", action="store_true",
                       help="torch.compile the training forward (as LlamaGen's trainer does by default; the first "
                            "steps are slow while it compiles)")
    optim.add_argument("--recompute-logits", action="store_true",
                       help="never hold the [batch, tokens, k, vocab] logits: compute the loss one slot at a time and "
                            "recompute the head in the backward pass (less memory, one more head forward)")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--out", default="tensorar_finetune",
                           help="output folder; one that holds an earlier run needs --resume or --overwrite")
    run_group.add_argument("--overwrite", action="store_true",
                           help="start again in an --out that holds an earlier run: delete its metrics.jsonl, "
                                "checkpoint-<step>/ and final/ first")
    run_group.add_argument("--save-every", type=int, default=1000,
                           help="steps between checkpoints (0: only at the end)")
    run_group.add_argument("--keep-checkpoints", type=int, default=None,
                           help="keep only the newest N checkpoints (default: all)")
    run_group.add_argument("--save-backbone", type=_optional_bool, default=None, metavar="{auto,yes,no}",
                           help="include the backbone in saved weights (default: auto = unless --freeze-backbone)")
    run_group.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    run_group.add_argument("--resume", default=None,
                           help="checkpoint folder to resume from, or 'latest' (newest in --out, if any)")
    run_group.add_argument("--seed", type=int, default=0, help="random seed (data order, noise, new parts)")
    run_group.add_argument("--device", default=None,
                           help="device, e.g. cuda, cuda:1 or cpu (default: cuda:<LOCAL_RANK> if available)")
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import about_flag
    from ..data import CodesDataset, CodeSetsDataset
    from ..hub import load_llamagen
    from ..train import Trainer, distributed_info, init_distributed
    from ..wrapper import TensorARWrapper

    if args.device is not None:
        from .sample import resolve_device

        resolve_device(args.device)  # before any process group or model: "--device cuda" on a CPU machine
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ValueError("--fsdp shards the model over the processes of a torchrun launch: run torchrun "
                         "--nproc_per_node N -m tensorar_plugin.cli finetune ... --fsdp (one process needs no "
                         "--fsdp)")
    owns_group = init_distributed(args.device)
    rank = distributed_info()[0]
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("tensorar_plugin.finetune")
    try:
        if args.no_augment and len(args.codes) > 1:
            raise ValueError(f"--no-augment always reads the first view of the first --codes folder, so the other "
                             f"{len(args.codes) - 1} would never be read: pass one --codes folder, or drop "
                             f"--no-augment")
        if args.window < 1:
            raise ValueError(f"--window must be >= 1, got {args.window}")
        overrides = parse_overrides(args.model_config)
        with about_flag("--model", args.model):
            model = load_llamagen(args.model, preset=args.preset, image_size=args.image_size,
                                  cache_dir=args.cache_dir, local_files_only=args.local_files_only, **overrides)
        if model.model_type != "c2i":
            raise ValueError(f"{args.model} is a text-conditional model; `tensorar finetune` trains class-conditional "
                             f"models on class-labelled codes. Use tensorar_plugin.train.Trainer with a dataset of "
                             f"(codes, caption features) for text-conditional fine-tuning.")
        torch.manual_seed(args.seed)  # the TensorAR parts start identical on every rank
        given = {name: getattr(args, name) for name in TENSORAR_FLAGS if hasattr(args, name)}
        if args.init_from:
            with about_flag("--init-from", args.init_from):
                wrapper = TensorARWrapper.from_pretrained(args.init_from, model, window=args.window)
            check_saved_settings(wrapper.config.to_dict(), given, args.init_from)
            wrapper.set_backbone_frozen(args.freeze_backbone)
        else:
            wrapper = TensorARWrapper(model, window=args.window, freeze_backbone=args.freeze_backbone, **given)
        with about_flag("--codes"):
            sets = [CodesDataset(codes, num_tokens=model.block_size, codebook_size=wrapper.vocab_size,
                                 num_classes=model.num_classes, seed=args.seed, augment=not args.no_augment)
                    for codes in args.codes]
        dataset = sets[0] if len(sets) == 1 else CodeSetsDataset(sets, seed=args.seed, augment=not args.no_augment)
        log.info("dataset: %r", dataset)
        config = _train_config(
            lr=args.lr, betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
            grad_clip=args.grad_clip or None, warmup_steps=args.warmup, lr_schedule=args.lr_schedule,
            max_steps=args.steps, batch_size=args.batch_size, grad_accum_steps=args.grad_accum,
            mixed_precision=args.precision, ema_decay=args.ema, log_every=args.log_every,
            ckpt_every=args.save_every, keep_checkpoints=args.keep_checkpoints, out_dir=args.out, seed=args.seed,
            num_workers=args.num_workers if args.num_workers is not None else min(4, os.cpu_count() or 1),
            device=args.device, fsdp=args.fsdp, recompute_logits=args.recompute_logits,
            compile=args.compile, save_backbone=args.save_backbone, resume_from=args.resume, overwrite=args.overwrite,
            progress=not args.no_progress,
            extra={"model": str(args.model), "image_size": args.image_size, "model_config": overrides,
                   "codes": args.codes[0] if len(args.codes) == 1 else args.codes, "window": args.window},
        )
        try:
            trainer = Trainer(wrapper, dataset, config)
        except ValueError as err:
            raise flag_error(err) from None
        metrics = trainer.train()
        if rank == 0:
            loss = metrics.get("loss")
            print(f"fine-tuned to step {trainer.step}" + (f" (loss {loss:.4f})" if loss is not None else "")
                  + f"; model saved to {trainer.out_dir / 'final'}")
    finally:  # bad data and settings reach the user as one `error:` line through cli.main
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def _train_config(**kwargs: Any):
    """`TrainConfig(**kwargs)`, its refusals worded with the command's flags."""
    from ..train import TrainConfig

    try:
        return TrainConfig(**kwargs)
    except ValueError as err:
        raise flag_error(err, anywhere=True) from None
