"""Training's set-up: data, model, optimizer, task weights, validation set and batches, built once into the
`TrainState` the loop advances; with --resume, restored from the newest checkpoint under --out."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from fashionbert.data import storage
from fashionbert.data.batching import (Batch, BatchSettings, ImageStream, MaskingVocab, PairBuilder, Prefetcher,
                                       StreamPosition, iter_batches)
from fashionbert.data.features import (FeatureReader, ImageIndex, TextTable, index_images, load_texts,
                                       open_feature_folders, validation_mask)
from fashionbert.errors import UserError
from fashionbert.evaluation.sample_hundred import SampleHundred, build_sample_hundred
from fashionbert.model.backbone import backbone_layers, load_tokenizer
from fashionbert.model.config import FashionBertConfig
from fashionbert.model.contrastive import EmbeddingQueue
from fashionbert.model.hard_negatives import MiningBank
from fashionbert.model.modeling import FashionBertModel
from fashionbert.runtime import Runtime
from fashionbert.train import checkpoint as ckpt
from fashionbert.train.adaptive_loss import TaskWeighter
from fashionbert.train.config import TrainConfig
from fashionbert.train.optim import build_optimizer, lr_lambda, restore_optimizer

# Options that fix the data order or the optimisation: a resumed run must use the checkpoint's values,
# or it would not continue the same run.
RESUME_MUST_MATCH = ("batch_size", "itc_dim", "itc_pooling", "dropout", "tia_warmup", "itc_warmup", "matching_only", "grad_accum", "neg_ratio",
                     "random_neg_fraction", "hard_neg_fraction", "hard_neg_temperature", "hard_neg_similarity", "group_negatives", "subcategory_batches", "itc_queue", "mining_bank", "mining_bank_after", "fusion_layer", "fusion_token_drop", "own_fusion_layers", "detach_fusion_input", "tia_pooling", "tia_residual", "tia_loss", "joint_lr", "text_variants", "seed", "split_seed", "val_fraction", "task_weights", "lr", "warmup",
                     "weight_decay", "shuffle_window", "world_size")

# What a checkpoint written before an option existed ran with.
BEFORE_OPTION = {"hard_neg_fraction": 0.0, "hard_neg_temperature": 0.0, "hard_neg_similarity": "cosine", "itc_queue": 0, "fusion_layer": 0,
                 "tia_pooling": "cls", "keep_recall": False, "hidden_weight": 0.0,
                 "matching_only": False, "group_negatives": False, "own_fusion_layers": False,
                 "detach_fusion_input": False, "tia_residual": False, "itc_warmup": 0.0,
                 "subcategory_batches": False, "tia_loss": "binary", "mining_bank": 0, "mining_bank_after": 0, "fusion_token_drop": 0.0,
                 "joint_lr": 0.0,
                 # a folder from before text variants has none: such a run trained as --text-variants does there
                 "text_variants": True}


@dataclasses.dataclass
class TrainingData:
    """The feature folders' texts and images, split into training and held-out rows by product group."""
    texts: TextTable
    index: ImageIndex
    train_rows: np.ndarray
    val_rows: np.ndarray
    grid: int
    feature_dim: int
    feature_options: dict[str, Any]  # featurize's options (max_text_len, cnn, patch_mode)

    @property
    def train_products(self) -> np.ndarray:
        return np.unique(self.index.product[self.train_rows])


ModelFactory = Callable[[TrainConfig, "TrainingData"], tuple[FashionBertModel, FashionBertConfig, Any]]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a run optimises where it differs from pretraining (None = pretraining's): the model a fresh run starts
    from, one micro-batch's forward and backward (`step.micro_step`'s signature), the tasks it logs, the options a
    --resume must keep besides RESUME_MUST_MATCH, and its start line. Distillation (train/distill.py) is the other
    objective; the loop, checkpoints, --resume, validation and curves are the same for both."""
    name: str = "train"
    new_model: ModelFactory | None = None
    micro_step: Callable | None = None
    tasks: tuple[str, ...] | None = None  # None: the model's own (`FashionBertModel.tasks`)
    resume_keys: tuple[str, ...] = ()
    describe: Callable[["TrainState"], str] | None = None
    matching_only: bool = False  # every batch clean, as pretraining's warm-up batches (no MLM/MPM masks)
    # Marks the parameters the run leaves as they are (requires_grad False), on a fresh and a resumed model alike,
    # before the optimizer is built; None = every parameter trains.
    freeze: Callable[[FashionBertModel], None] | None = None


@dataclasses.dataclass
class TrainState:
    """What the loop reads and advances. `step` counts completed optimizer steps; `position` is where this
    process's batch stream stands after them."""
    config: TrainConfig
    out: Path
    data: TrainingData
    model: FashionBertModel  # the weights checkpoints save
    model_config: FashionBertConfig
    train_model: torch.nn.Module  # the model, or its DDP wrapper: forward and backward go through this
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    weighter: TaskWeighter
    batches: Iterator[Batch]
    validation: SampleHundred | None  # held-out queries; the main process validates, the others hold None
    queue: EmbeddingQueue | None  # --itc-queue's recent contrastive vectors (the same in every process)
    bank: MiningBank | None  # --mining-bank's recent positives, which mined negatives are drawn from too
    options: dict[str, Any]  # the run's options, as every checkpoint records them
    total_steps: int
    tia_steps: int  # the first steps train the matching tasks alone
    itc_steps: int  # the first steps train the itc task alone (no joint pass); within or beyond tia_steps
    step: int
    position: StreamPosition
    resumed_from: Path | None
    objective: Objective = Objective()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks the steps report losses for, in the order they are logged."""
        return self.objective.tasks or self.model.tasks

    @property
    def bank_in_use(self) -> MiningBank | None:
        """The mining bank this step draws from and fills: none before --mining-bank-after's joint steps are over."""
        return self.bank if self.step >= self.itc_steps + self.config.mining_bank_after else None

    def close(self) -> None:
        if isinstance(self.batches, Prefetcher):
            self.batches.close()


def build_state(config: TrainConfig, rt: Runtime, objective: Objective = Objective()) -> TrainState:
    """Everything the loop needs for `config`, continued from the newest checkpoint under --out with --resume."""
    out = _prepare_out(config, rt)
    resumed_from = ckpt.latest_checkpoint(out) if config.resume else None
    data = load_data(config, rt.world)
    total_steps = _total_steps(config, len(data.train_rows), rt.world)
    options = run_options(config, rt.world)
    info, saved = ckpt.load_training_state(resumed_from) if resumed_from is not None else ({}, {})
    if resumed_from is not None:
        _check_resume_options(info.get("options", {}), options, resumed_from, objective.resume_keys)
        model, model_config, tokenizer = _load_model(resumed_from)
    else:
        model, model_config, tokenizer = (objective.new_model or _new_model)(config, data)
    _check_features_fit(model_config, data)
    if objective.freeze is not None:
        objective.freeze(model)
    model.to(rt.device).train()

    warmup_steps = _steps_of(config.warmup, total_steps)
    matching_only = objective.matching_only or config.matching_only
    tia_steps = total_steps if matching_only else _steps_of(config.tia_warmup, total_steps)
    itc_steps = itc_alone_steps(config, total_steps)
    schedule = lr_lambda(warmup_steps, total_steps, itc_steps, _joint_lr_peak(config, itc_steps))
    optimizer, scheduler = build_optimizer(model, config.lr, config.weight_decay, rt.device, schedule)
    step, position = 0, StreamPosition()
    if resumed_from is not None:
        restore_optimizer(optimizer, scheduler, saved, schedule)
        step = int(info["step"])
        positions = info.get("positions") or [[0, 0]]
        position = StreamPosition(*positions[rt.rank if rt.rank < len(positions) else 0])
        ckpt.set_rng_state(saved["rng"])
    queue = EmbeddingQueue(config.itc_queue, config.itc_dim) if config.itc_queue > 0 else None
    if queue is not None and "itc_queue" in saved:
        queue.load_state_dict(saved["itc_queue"])
    bank = MiningBank(config.mining_bank) if config.mining_bank > 0 else None
    if bank is not None and "mining_bank" in saved:
        bank.load_state_dict(saved["mining_bank"])
    train_model = _distributed(model, rt)
    weighter = TaskWeighter(config.task_weights, model, model.tasks, distributed=rt.distributed)
    reader = FeatureReader(data.index.shards, model_config.num_patches, model_config.feature_dim)
    validation = None
    if rt.main and len(data.val_rows):
        validation = build_sample_hundred(data.texts, data.index, data.val_rows, reader, queries=config.val_queries,
                                          max_pool=config.val_max_images, seed=config.split_seed)
    batches = _batches(config, data, reader, model_config, tokenizer, rt, max(tia_steps, itc_steps), position, step)
    return TrainState(config=config, out=out, data=data, model=model, model_config=model_config,
                      train_model=train_model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                      weighter=weighter, batches=batches, validation=validation, queue=queue, bank=bank,
                      options=options, total_steps=total_steps, tia_steps=tia_steps, itc_steps=itc_steps, step=step,
                      position=position, resumed_from=resumed_from, objective=objective)


def _prepare_out(config: TrainConfig, rt: Runtime) -> Path:
    if storage.is_remote(config.out):
        raise UserError(f"--out {config.out}: train writes its checkpoints and model to a local folder (it syncs and "
                        f"renames them in place); train into a local --out, then upload it, e.g. `gsutil -m cp -r OUT "
                        f"{config.out}` or `aws s3 cp --recursive OUT {config.out}`; --features may stay a URI")
    out = Path(config.out).expanduser()
    if config.batch_size < 1 or config.grad_accum < 1 or config.neg_ratio < 0:
        raise UserError("--batch-size and --grad-accum must be >= 1, --neg-ratio >= 0")
    if not 0.0 <= config.random_neg_fraction <= 1.0:
        raise UserError("--random-neg-fraction must be in [0, 1]")
    if not 0.0 <= hard_neg_fraction(config) <= 1.0 or config.hard_neg_temperature < 0:
        raise UserError("--hard-neg-fraction must be in [0, 1] and --hard-neg-temperature >= 0")
    if tia_pooling(config) == "halves" and config.itc_dim <= 0:
        raise UserError("--tia-pooling halves reads the joint pass through the itc head's projections, which "
                        "--itc-dim 0 turns off: pass --tia-pooling cls with --itc-dim 0")
    if config.tia_residual and config.itc_dim <= 0:
        raise UserError("--tia-residual adds the itc cosine to the TIA logit, and --itc-dim 0 turns the itc head off: "
                        "drop one of the two")
    mining = f"--hard-neg-fraction {hard_neg_fraction(config)}, --neg-ratio {config.neg_ratio}"
    mines = hard_neg_fraction(config) > 0 and config.neg_ratio >= 1
    if config.tia_loss != "binary" and not mines:
        raise UserError(f"--tia-loss {config.tia_loss} ranks each mined negative against its positive, and this run "
                        f"mines none ({mining}): pass --hard-neg-fraction > 0 and --neg-ratio >= 1, or --tia-loss binary")
    if config.hard_neg_similarity != "cosine" and not mines:
        raise UserError(f"--hard-neg-similarity {config.hard_neg_similarity} chooses how mined negatives are drawn, and "
                        f"this run mines none ({mining}): pass --hard-neg-fraction > 0 and --neg-ratio >= 1, or "
                        f"--hard-neg-similarity cosine")
    if config.mining_bank < 0 or (config.mining_bank > 0 and not mines):
        raise UserError(f"--mining-bank {config.mining_bank}: must be >= 0, and is a pool for mined negatives, which "
                        f"this run draws none of ({mining}): pass --hard-neg-fraction > 0 and --neg-ratio >= 1, or "
                        f"--mining-bank 0")
    if config.mining_bank_after < 0 or (config.mining_bank_after > 0 and config.mining_bank <= 0):
        raise UserError(f"--mining-bank-after {config.mining_bank_after}: must be >= 0, and delays --mining-bank, which "
                        f"is {config.mining_bank}: pass --mining-bank N (e.g. 2048), or --mining-bank-after 0")
    if not 0.0 <= config.fusion_token_drop < 1.0:
        raise UserError(f"--fusion-token-drop {config.fusion_token_drop}: the share of each joint-pass row hidden "
                        f"from the fusion layers must be in [0, 1) (e.g. 0.2; 0 = off)")
    if config.own_fusion_layers and fusion_layer(config) < 1:
        raise UserError(f"--own-fusion-layers gives the layers above --fusion-layer weights of their own; with "
                        f"--fusion-layer {fusion_layer(config)} there are none below it to share: pass --fusion-layer "
                        f">= 1 (the default is half the backbone's layers)")
    if config.detach_fusion_input and fusion_layer(config) < 1:
        raise UserError(f"--detach-fusion-input stops the joint pass's gradient at the --fusion-layer's input; with "
                        f"--fusion-layer {fusion_layer(config)} that input is the embeddings: pass --fusion-layer >= 1 "
                        f"(the default is half the backbone's layers)")
    if config.itc_queue < 0 or (config.itc_queue > 0 and config.itc_dim <= 0):
        raise UserError(f"--itc-queue {config.itc_queue}: must be >= 0, and needs the itc head (--itc-dim > 0)")
    if hard_neg_fraction(config) > 0 and config.neg_ratio > 0 and config.itc_dim <= 0:
        raise UserError(f"--hard-neg-fraction {hard_neg_fraction(config)} mines negatives from the itc similarity, which "
                        f"--itc-dim 0 turns off: pass --hard-neg-fraction 0 with --itc-dim 0")
    existing = ckpt.latest_checkpoint(out)
    if existing is not None and not config.resume:
        raise UserError(f"--out {out} already has checkpoints (newest {existing.name}); pass --resume to continue "
                        f"that run, or choose a new --out")
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    return out


def load_data(config: TrainConfig, world: int) -> TrainingData:
    folders = open_feature_folders(config.features)
    texts = load_texts(folders, variants=config.text_variants)
    index = index_images(folders, texts)
    if not len(index):
        raise UserError(f"--features {', '.join(map(str, config.features))}: no image row has a product text; "
                        f"nothing to train on")
    is_val_product = validation_mask(texts.group_id, config.val_fraction, config.split_seed)
    is_val_row = is_val_product[index.product]
    train_rows, val_rows = np.nonzero(~is_val_row)[0], np.nonzero(is_val_row)[0]
    if len(train_rows) < world:
        raise UserError(f"only {len(train_rows)} training images after holding out --val-fraction "
                        f"{config.val_fraction}; lower it or featurize more products")
    return TrainingData(texts, index, train_rows, val_rows, folders[0].grid, folders[0].feature_dim,
                        folders[0].options)


def _total_steps(config: TrainConfig, train_images: int, world: int) -> int:
    if config.steps is not None:
        total = int(config.steps)
    else:
        positives_per_step = config.batch_size * config.grad_accum * world
        total = max(1, math.ceil((config.epochs or 1.0) * train_images / positives_per_step))
    if total < 1:
        raise UserError("--steps must be >= 1")
    return total


def _steps_of(value: float, total_steps: int) -> int:
    """A step count given as steps (>= 1) or as a fraction of all steps (< 1)."""
    return int(value) if value >= 1 else int(round(value * total_steps))


def itc_alone_steps(config: TrainConfig, total_steps: int) -> int:
    """--itc-warmup in steps, checked: the itc task alone needs the itc head, and TIA must get some steps."""
    if config.itc_warmup < 0:
        raise UserError(f"--itc-warmup {config.itc_warmup}: must be >= 0 (steps if >= 1, else a fraction of all steps)")
    steps = _steps_of(config.itc_warmup, total_steps)
    if steps and config.itc_dim <= 0:
        raise UserError("--itc-warmup trains the contrastive itc task alone, which --itc-dim 0 turns off: drop one of "
                        "the two")
    if steps >= total_steps:
        raise UserError(f"--itc-warmup {config.itc_warmup} is {steps} of the run's {total_steps} steps: TIA would never "
                        f"train; leave it some steps (e.g. --itc-warmup 0.5)")
    return steps


def _joint_lr_peak(config: TrainConfig, itc_steps: int) -> float:
    """--joint-lr as a multiplier of --lr (0: one schedule for the whole run), checked."""
    if config.joint_lr < 0:
        raise UserError(f"--joint-lr {config.joint_lr}: must be >= 0 (0 = the --lr schedule runs on through the joint "
                        f"steps)")
    if not config.joint_lr:
        return 0.0
    if not itc_steps:
        raise UserError("--joint-lr restarts the learning-rate schedule at the first joint step after --itc-warmup, "
                        "and this run has no --itc-warmup steps: pass --itc-warmup, or set the rate with --lr alone")
    if config.lr <= 0:
        raise UserError(f"--joint-lr {config.joint_lr} with --lr {config.lr}: the schedule is a multiple of --lr, so "
                        f"--joint-lr needs --lr > 0")
    return config.joint_lr / config.lr


def run_options(config: TrainConfig, world: int) -> dict[str, Any]:
    """The options a run records in every checkpoint: the config, features resolved, defaults resolved."""
    options = dataclasses.asdict(config)
    options["features"] = [f if storage.is_remote(f) else str(Path(f).expanduser().resolve()) for f in config.features]
    options["world_size"] = world
    options["hard_neg_fraction"] = hard_neg_fraction(config)
    options["tia_pooling"] = tia_pooling(config)
    options["fusion_layer"] = fusion_layer(config)
    return options


def hard_neg_fraction(config: TrainConfig) -> float:
    """--hard-neg-fraction, or its default: all negatives mined when the model has the itc head to mine with."""
    if config.hard_neg_fraction is not None:
        return float(config.hard_neg_fraction)
    return 1.0 if config.itc_dim > 0 else 0.0


def tia_pooling(config: TrainConfig) -> str:
    """--tia-pooling, or its default: the halves' agreement where the itc head gives it projections."""
    if config.tia_pooling is not None:
        return config.tia_pooling
    return "halves" if config.itc_dim > 0 else "cls"


def fusion_layer(config: TrainConfig) -> int:
    """--fusion-layer, or its default: half the backbone's layers (ALBEF's split of 6 unimodal + 6 fusion layers)."""
    if config.fusion_layer is not None:
        return int(config.fusion_layer)
    return backbone_layers(config.backbone) // 2


def _check_resume_options(saved: dict, current: dict, where: Path, more_keys: tuple[str, ...] = ()) -> None:
    saved = {**BEFORE_OPTION, **saved}
    diff = [f"--{k.replace('_', '-')} {current.get(k)!r} (checkpoint: {saved.get(k)!r})"
            for k in RESUME_MUST_MATCH + tuple(more_keys) if k in saved and saved.get(k) != current.get(k)]
    if sorted(map(str, saved.get("features", []))) != sorted(map(str, current.get("features", []))):
        diff.append(f"--features {current.get('features')} (checkpoint: {saved.get('features')})")
    if diff:
        raise UserError(f"--resume: options differ from the run in {where}: {'; '.join(diff)}; resume with the "
                        f"checkpoint's options or train into a new --out")


def _load_model(checkpoint: Path) -> tuple[FashionBertModel, FashionBertConfig, Any]:
    model = FashionBertModel.from_checkpoint(checkpoint)
    return model, model.config, load_tokenizer(checkpoint)


def _new_model(config: TrainConfig, data: TrainingData) -> tuple[FashionBertModel, FashionBertConfig, Any]:
    """The pretrained backbone with freshly initialised patch embeddings and heads (seeded by --seed)."""
    options = data.feature_options
    model_config = FashionBertConfig(
        backbone=str(config.backbone), max_text_len=config.max_text_len or int(options.get("max_text_len") or 64),
        grid=data.grid, feature_dim=data.feature_dim, cnn=str(options.get("cnn") or ""),
        patch_mode=str(options.get("patch_mode") or ""), mlm_probability=config.mlm_probability,
        mpm_probability=config.mpm_probability, whole_word_mask=config.whole_word_mask,
        dropout=None if config.dropout < 0 else config.dropout, itc_dim=config.itc_dim,
        itc_pooling=config.itc_pooling, fusion_layer=fusion_layer(config),
        own_fusion_layers=bool(config.own_fusion_layers), detach_fusion_input=bool(config.detach_fusion_input),
        tia_pooling=tia_pooling(config), tia_residual=bool(config.tia_residual), tia_loss=str(config.tia_loss),
        fusion_token_drop=float(config.fusion_token_drop),
    )
    torch.manual_seed(config.seed)
    model = FashionBertModel.from_pretrained_backbone(model_config)
    return model, model_config, load_tokenizer(config.backbone)


def _check_features_fit(model_config: FashionBertConfig, data: TrainingData) -> None:
    if (model_config.grid, model_config.feature_dim) != (data.grid, data.feature_dim):
        raise UserError(f"the checkpoint expects grid {model_config.grid} x feature_dim {model_config.feature_dim}, "
                        f"the features have {data.grid} x {data.feature_dim}")
    if data.texts.max_token_id() >= model_config.vocab_size:
        raise UserError(f"--features texts hold token id {data.texts.max_token_id()} >= the backbone's vocabulary "
                        f"({model_config.vocab_size}): they were tokenized for another backbone; featurize with the "
                        f"same --backbone as train")


def _distributed(model: FashionBertModel, rt: Runtime) -> torch.nn.Module:
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def _batches(config: TrainConfig, data: TrainingData, reader: FeatureReader, model_config: FashionBertConfig,
             tokenizer, rt: Runtime, tia_steps: int, position: StreamPosition, step: int) -> Iterator[Batch]:
    """This process's endless batches from `position` on (batch numbers continue from `step`)."""
    settings = BatchSettings(
        batch_size=config.batch_size, max_text_len=model_config.max_text_len, pad_token_id=model_config.pad_token_id,
        sep_token_id=model_config.sep_token_id, mlm_probability=model_config.mlm_probability,
        mpm_probability=model_config.mpm_probability, whole_word_mask=model_config.whole_word_mask,
        unmasked_batches=tia_steps * config.grad_accum, mining_temperature=config.hard_neg_temperature,
        mining_similarity=config.hard_neg_similarity)
    vocab = MaskingVocab.from_tokenizer(tokenizer, model_config.vocab_size)
    pairs = PairBuilder(data.texts, data.train_products, config.neg_ratio, config.random_neg_fraction,
                        hard_neg_fraction(config), config.group_negatives)
    stream = ImageStream(data.index, data.train_rows, reader, seed=config.seed, rank=rt.rank, world=rt.world,
                         window_rows=config.shuffle_window,
                         groups=pairs.group_code[data.index.product] if config.group_negatives else None,
                         subcategories=(data.texts.subcategory_codes()[data.index.product]
                                        if config.subcategory_batches else None))
    batches = iter_batches(stream, pairs, settings, vocab, config.seed, position,
                           first_index=step * config.grad_accum)
    return Prefetcher(batches, config.prefetch) if config.prefetch > 0 else batches

