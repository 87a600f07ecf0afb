"""fashionbert distill: a student with fewer encoder layers, trained to give a teacher's scores.

    fashionbert distill --teacher MODEL --layers N --out DIR [--features DIR] [options]

Why: re-ranking is ~95% of a retrieval run's compute and a cross-encoder pair costs in proportion to the encoder's
layers (the FashionBERT paper deployed layer-reduced variants for the same reason).

The student is the teacher with N encoder layers: the teacher's config with num_hidden_layers N, every other weight
(embeddings, patch projection, pooler, heads, itc head) copied, and its layer k a copy of teacher layer
`chosen_layers(L, N)[k]`, the last layer of each of N equal blocks of the teacher's L (6->3: 1, 3, 5; 6->2: 2, 5;
6->1: 5), so the top layer, whose output the pooler and the heads were trained on, is always kept. A late-fusion
teacher (fusion_layer k) gives a student whose fusion_layer counts the chosen layers below k: each copied layer keeps
the inputs it was trained on (unimodal or joint), and the top layer always fuses.

--keep-recall (the default) distils the joint pass only. The text-only and image-only passes (the recall embeddings,
and the cosine half of the ranking score) run once per item, not once per pair, so making them cheaper buys little
and costs the recall stage as much quality as the cross-encoder loses (measured: the itc cosine's Rank@1 fell with the
student's layers, README). So the student keeps all of the teacher's layers for them as its `recall_encoder`
(config.recall_layers), and those layers, the embeddings and the itc head stay frozen: the student's recall vectors
are the teacher's, bit for bit, and only its N joint layers, pooler and TIA head train (kd_tia, kd_hidden). With
--no-keep-recall the N layers serve all three passes and kd_itc / kd_emb train the recall vectors too.

Each step the teacher (eval mode, no gradient, bf16 where the runtime is) runs `fashionbert train`'s own batches (clean,
unmasked pairs: the positives, random and same-sub-category negatives, and negatives mined from ITS itc similarity,
the confusable pairs a re-ranker is for), and the student is trained to match it on the same rows:
- kd_tia: T^2 KL(softmax(teacher TIA logits / T) || softmax(student's / T)) over every row of the joint pass;
- kd_hidden: the joint pass layer for layer (TinyBERT's hidden-state loss): mean squared difference of the student's
  layer k output and its teacher layer's (`chosen_layers`), over the text tokens and the patches. A dense target for
  every state the TIA logit is read from, where kd_tia gives two numbers per row;
- kd_itc: KL between the teacher's and the student's in-batch similarity distributions of the aligned rows' itc
  vectors (each text over the images, each image over the texts, at each model's own logit scale): the recall
  stage's ranking;
- kd_emb: 1 - cosine of the student's itc vectors to the teacher's (text and image): keeps the vectors in the
  teacher's space, so the fusion's weighting of the cosine keeps its meaning.
The loss is their sum with --*-weight (fixed). The student's own held-out split is the teacher's (read from the
teacher's training run), so its validation and `fashionbert evaluate` measure products neither model trained on.

The loop, checkpoints, --resume, progress, metrics.jsonl, curves and the refitted score fusion are `fashionbert
train`'s (train/trainer.py with the `Objective` below): OUT/model is an ordinary model folder that retrieve,
score-pairs, evaluate, report and nightly take with --model. One process (no torchrun).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fashionbert.data import storage
from fashionbert.data.batching import Batch
from fashionbert.errors import UserError
from fashionbert.model.backbone import load_tokenizer
from fashionbert.model.contrastive import itc_inputs
from fashionbert.model.loading import training_options
from fashionbert.model.modeling import FashionBertModel
from fashionbert.runtime import Runtime
from fashionbert.train import config as train_config
from fashionbert.train.config import TrainConfig
from fashionbert.train.state import Objective, TrainState, TrainingData
from fashionbert.train.step import step_seed

TASKS = ("kd_tia", "kd_hidden", "kd_itc", "kd_emb")
# Options a --resume must keep besides train's (state.RESUME_MUST_MATCH).
RESUME_KEYS = ("teacher", "layers", "keep_recall", "temperature", "tia_weight", "hidden_weight", "itc_weight",
               "emb_weight")
# What --keep-recall freezes: everything the text-only and image-only passes read.
RECALL_PREFIXES = ("bert.embeddings.", "patch_embeddings.", "recall_encoder.", "itc_head.")


@dataclasses.dataclass
class DistillConfig(TrainConfig):
    teacher: str = ""  # model folder (OUT/model of `fashionbert train`)
    layers: int = 0  # the student's encoder layers
    keep_recall: bool = True  # the teacher's layers, frozen, for the text-only and image-only passes
    temperature: float = 4.0
    tia_weight: float = 1.0
    hidden_weight: float = 1.0  # 0: no kd_hidden (and no per-layer states kept)
    itc_weight: float = 1.0
    emb_weight: float = 1.0
    # None: the teacher's (from its training run), so that the held-out products stay held out
    val_fraction: float | None = None
    split_seed: int | None = None


D = DistillConfig()


# ============================================================================================ the student
def chosen_layers(teacher_layers: int, layers: int) -> list[int]:
    """The teacher layers the student's layers start from: the last of each of `layers` equal blocks."""
    if not 1 <= layers < teacher_layers:
        raise UserError(f"--layers {layers}: the student needs at least 1 and fewer than the teacher's "
                        f"{teacher_layers} encoder layers")
    return [(k + 1) * teacher_layers // layers - 1 for k in range(layers)]


def build_student(teacher: FashionBertModel, layers: int, from_layers: list[int] | None = None,
                  keep_recall: bool = False) -> FashionBertModel:
    """The teacher with `layers` encoder layers (copies of `chosen_layers`, or of `from_layers` to compare rules),
    every other weight copied; with `keep_recall`, a recall encoder that is a copy of the teacher's (its
    recall encoder where it has one, else all its encoder layers)."""
    if getattr(teacher, "fusion_layers", None) is not None:
        raise UserError("the teacher has fusion layers of its own (trained with --own-fusion-layers): distill picks a "
                        "student's layers from one stack and cannot split two yet; distil a teacher trained without it")
    if teacher.config.tia_residual:
        raise UserError("the teacher's TIA logit adds the itc cosine (trained with --tia-residual): distill matches a "
                        "student's joint pass to the teacher's logits and does not give the student that term yet; "
                        "distil a teacher trained without it")
    config = copy.deepcopy(teacher.config)
    teacher_layers = int(config.bert["num_hidden_layers"])
    chosen = from_layers or chosen_layers(teacher_layers, layers)
    config.bert = {**config.bert, "num_hidden_layers": layers}
    teacher_recall = getattr(teacher, "recall_encoder", None)
    config.recall_layers = (len(teacher_recall.layer) if teacher_recall is not None else teacher_layers) if keep_recall else 0
    config.fusion_layer = sum(1 for i in chosen if i < int(teacher.config.fusion_layer))
    # The student's layers below its fusion layer learn from the teacher through the joint pass (and may be none).
    config.detach_fusion_input = False
    # The student's joint pass is matched to the teacher's, which sees every token.
    config.fusion_token_drop = 0.0
    head = getattr(teacher, "itc_head", None)
    if head is not None:  # a head attached to a config that predates itc_dim: the student's config names it
        config.itc_dim, config.itc_pooling = head.dim, head.pooling
    student = FashionBertModel(config)
    source = {f"bert.encoder.layer.{i}.": f"bert.encoder.layer.{k}." for k, i in enumerate(chosen)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith("recall_encoder."):
            if keep_recall:
                state[name] = tensor.detach().clone()
            continue
        if name.startswith("bert.encoder.layer."):
            if keep_recall and teacher_recall is None:
                state["recall_encoder." + name[len("bert.encoder."):]] = tensor.detach().clone()
            prefix = ".".join(name.split(".")[:4]) + "."
            if prefix not in source:
                continue
            name = source[prefix] + name[len(prefix):]
        state[name] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    return student


def freeze_recall(model: FashionBertModel) -> None:
    """--keep-recall: the parameters the text-only and image-only passes read stay the teacher's."""
    for name, p in model.named_parameters():
        if name.startswith(RECALL_PREFIXES):
            p.requires_grad_(False)


def load_teacher(folder: str) -> FashionBertModel:
    if not folder:
        raise UserError("--teacher: give the model folder to distil (OUT/model of `fashionbert train`)")
    if storage.is_remote(folder):
        # Distillation reads the teacher's training run beside it (summary, checkpoints): a local folder, as train's.
        raise UserError(f"--teacher {folder}: distill reads a local model folder; copy the training run down first "
                        f"(e.g. gsutil -m cp -r gs://bucket/run .) and pass --teacher run/model")
    if not Path(folder).expanduser().is_dir():
        raise UserError(f"--teacher {folder}: no such folder; point it at OUT/model of `fashionbert train`")
    try:
        teacher = FashionBertModel.from_checkpoint(Path(folder).expanduser())
    except UserError as exc:
        raise UserError(f"--teacher {exc}") from None
    return teacher.eval().requires_grad_(False)


# ============================================================================================ the loss
def kl_rows(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(softmax(target) || softmax(logits)), float32."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), F.log_softmax(target_logits.float(), dim=-1),
                    log_target=True, reduction="batchmean")


def tia_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """kd_tia: T^2 KL of the TIA distributions at temperature T (T^2 keeps the gradient's scale as T changes)."""
    return kl_rows(teacher_logits / temperature, student_logits / temperature) * temperature ** 2


def similarity_divergence(student: tuple[torch.Tensor, torch.Tensor], student_scale: torch.Tensor,
                          teacher: tuple[torch.Tensor, torch.Tensor], teacher_scale: torch.Tensor) -> torch.Tensor:
    """kd_itc: KL of the in-batch similarity distributions, text->image rows and image->text columns averaged."""
    s = student_scale * student[0] @ student[1].T
    t = teacher_scale * teacher[0] @ teacher[1].T
    return 0.5 * (kl_rows(t, s) + kl_rows(t.T, s.T))


def embedding_distance(student: tuple[torch.Tensor, torch.Tensor], teacher: tuple[torch.Tensor, torch.Tensor]
                       ) -> torch.Tensor:
    """kd_emb: 1 - cosine of the (L2-normalised) itc vectors, text and image averaged."""
    return 1.0 - 0.5 * ((student[0] * teacher[0]).sum(-1).mean() + (student[1] * teacher[1]).sum(-1).mean())


def hidden_distance(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], chosen: list[int],
                    text_mask: torch.Tensor) -> torch.Tensor:
    """kd_hidden: mean over the student's layers k of the mean squared difference to teacher layer chosen[k]'s
    output, over the text tokens (padding left out) and every patch, float32."""
    patches = student_states[0].shape[1] - text_mask.shape[1]
    mask = torch.cat([text_mask, text_mask.new_ones(text_mask.shape[0], patches)], dim=1).to(torch.float32)
    per_layer = [((s.float() - teacher_states[i].float()) ** 2).mean(-1).mul(mask).sum() / mask.sum()
                 for s, i in zip(student_states, chosen)]
    return torch.stack(per_layer).mean()


def held_out_divergence(teacher: FashionBertModel, student: FashionBertModel, s100, rt: Runtime,
                        temperature: float) -> float:
    """kd_tia on held-out pairs: every (query text, candidate image) pair of a sample-100 draw (`s100`, from
    `sample_hundred.build_sample_hundred`), both models' TIA margins as training's validation scores them."""
    from fashionbert.evaluation.quick_validation import head_scores

    margins = [torch.from_numpy(head_scores(m, s100, m.config, rt)[0]).float() for m in (student, teacher)]
    logits = [F.pad(m.unsqueeze(1), (1, 0)) for m in margins]  # [0, margin]: the same softmax as the two logits
    return float(tia_divergence(logits[0], logits[1], temperature))


class Distillation:
    """The objective's micro-step: the teacher's outputs on a batch, the student's on the same rows, the loss."""

    def __init__(self, teacher: FashionBertModel, config: DistillConfig):
        self.teacher = teacher
        self.temperature = float(config.temperature)
        self.chosen = chosen_layers(int(teacher.config.bert["num_hidden_layers"]), config.layers)
        has_itc = getattr(teacher, "itc_head", None) is not None
        # With --keep-recall the student's itc vectors are the teacher's: kd_itc and kd_emb would be zero.
        self.tasks = tuple(t for t in TASKS if (t != "kd_hidden" or config.hidden_weight > 0)
                           and (t not in ("kd_itc", "kd_emb") or (has_itc and not config.keep_recall)))
        weights = {"kd_tia": config.tia_weight, "kd_hidden": config.hidden_weight, "kd_itc": config.itc_weight,
                   "kd_emb": config.emb_weight}
        self.weights = torch.tensor([float(weights[t]) for t in self.tasks])

    def losses(self, model: FashionBertModel, batch: Batch, rt: Runtime) -> tuple[dict[str, torch.Tensor], int]:
        """-> ({task: loss}, mined negative rows)."""
        teacher = self.teacher.to(rt.device)
        with torch.no_grad(), rt.autocast():
            taught = teacher(**batch.model_inputs())
            # the teacher's joint pass again, its layers' outputs kept (its forward keeps none): ~1/4 more per step
            teacher_states = teacher.joint_layer_states(*taught.joint_inputs)[0] if "kd_hidden" in self.tasks else None
        with rt.autocast():
            # one joint pass gives the TIA logits and, for kd_hidden, every layer's output
            states, sequence_output, pooled = model.joint_layer_states(*taught.joint_inputs)
            logits = model.alignment_logits(sequence_output, taught.joint_inputs[1], pooled)
            losses = {"kd_tia": tia_divergence(logits, taught.tia_logits, self.temperature)}
            if teacher_states is not None:
                losses["kd_hidden"] = hidden_distance(states, teacher_states, self.chosen, taught.joint_inputs[1])
            if "kd_itc" in self.tasks:
                ids, mask, feats = itc_inputs(batch.input_ids, batch.attention_mask, batch.patch_features,
                                              batch.tia_labels)
                vectors = model.itc_head(model, ids, mask, feats)
                losses["kd_itc"] = similarity_divergence(vectors, model.itc_head.scale(), taught.itc_vectors,
                                                         teacher.itc_head.scale())
                losses["kd_emb"] = embedding_distance(vectors, taught.itc_vectors)
        return losses, taught.mined

    def micro_step(self, state: TrainState, rt: Runtime, batch: Batch, last: bool):
        """Forward and backward of one micro-batch -> (per-task losses, weights, n (zeros), mined rows)."""
        if rt.distributed:  # the student's passes do not go through a DDP wrapper's forward
            raise UserError("distill runs in one process: start it without torchrun")
        torch.manual_seed(step_seed(state.config.seed, rt.rank, batch.index))  # dropout: same draws on resume
        losses, mined = self.losses(state.model, batch, rt)
        total = sum(float(w) * losses[t] for w, t in zip(self.weights, self.tasks))
        (total / state.config.grad_accum).backward()
        stacked = torch.stack([losses[t].detach().float().cpu() for t in self.tasks])
        return stacked, self.weights, torch.zeros(len(self.tasks)), mined


# ============================================================================================ the run
def resolve(config: DistillConfig, teacher: FashionBertModel) -> DistillConfig:
    """The run's config: features and held-out split from the teacher's training run unless given; the model
    options (which the student inherits) recorded as the teacher's; every batch clean (no MLM/MPM masks)."""
    options, source = training_options(Path(config.teacher).expanduser())
    features = list(config.features) or list(options.get("features") or [])
    if not features:
        raise UserError(f"--teacher {config.teacher}: its training run's features are not recorded (no "
                        f"checkpoints/*/training_state.json beside it); pass --features")
    missing = [f for f in features if not storage.is_remote(f) and not Path(f).expanduser().is_dir()]
    if missing:
        raise UserError(f"features {', '.join(missing)} (the teacher's{'' if config.features else ', from ' + str(source)}"
                        f"): no such folder; pass --features with the featurize output the teacher trained on")
    if config.layers < 1:
        raise UserError(f"--layers {config.layers}: the student needs at least 1 encoder layer")
    chosen_layers(int(teacher.config.bert["num_hidden_layers"]), config.layers)  # refuses N >= the teacher's
    tc = teacher.config
    head = getattr(teacher, "itc_head", None)
    return dataclasses.replace(
        config, features=[str(f) for f in features],
        val_fraction=config.val_fraction if config.val_fraction is not None else float(options.get("val_fraction", 0.05)),
        split_seed=config.split_seed if config.split_seed is not None else int(options.get("split_seed", 0)),
        backbone=str(tc.backbone), max_text_len=int(tc.max_text_len), dropout=-1.0 if tc.dropout is None else float(tc.dropout),
        itc_dim=head.dim if head is not None else 0, itc_pooling=head.pooling if head is not None else tc.itc_pooling,
        tia_pooling=str(tc.tia_pooling), fusion_layer=int(tc.fusion_layer), itc_queue=0, mlm_probability=tc.mlm_probability,
        mpm_probability=tc.mpm_probability, whole_word_mask=bool(tc.whole_word_mask),
        tia_warmup=0.0, task_weights="fixed")


def objective(teacher: FashionBertModel, config: DistillConfig) -> Objective:
    distillation = Distillation(teacher, config)
    chosen = chosen_layers(int(teacher.config.bert["num_hidden_layers"]), config.layers)

    def new_model(_config: TrainConfig, _data: TrainingData):
        student = build_student(teacher, config.layers, keep_recall=config.keep_recall)
        return student, student.config, load_tokenizer(config.teacher)

    def describe(state: TrainState) -> str:
        recall = ("the teacher's recall layers kept, frozen" if config.keep_recall else
                  "its layers also for the recall passes")
        return (f"student of {config.layers} layers from teacher layers {chosen} of {config.teacher} ({recall}); losses "
                f"{'/'.join(distillation.tasks)} weights {'/'.join(f'{float(w):g}' for w in distillation.weights)}, "
                f"T {config.temperature:g}")

    return Objective(name="distill", new_model=new_model, micro_step=distillation.micro_step,
                     tasks=distillation.tasks, resume_keys=RESUME_KEYS, matching_only=True, describe=describe,
                     freeze=freeze_recall if config.keep_recall else None)


def run(config: DistillConfig, on_step=None) -> dict[str, Any]:
    """Distil; returns train's summary (final step, metrics, model folder) with the chosen teacher layers."""
    from fashionbert.train.trainer import run as train_run

    teacher = load_teacher(config.teacher)
    resolved = resolve(config, teacher)
    if resolved.temperature <= 0:
        raise UserError(f"--temperature {resolved.temperature}: must be > 0")
    summary = train_run(resolved, on_step, objective(teacher, resolved))
    if summary:
        summary["teacher"] = str(config.teacher)
        summary["teacher_layers"] = chosen_layers(int(teacher.config.bert["num_hidden_layers"]), config.layers)
    return summary


# ============================================================================================ options
def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """The options distill takes; the model options train takes are the teacher's (`resolve`)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig) if hasattr(args, f.name)}
    return DistillConfig(**{**given, "features": list(args.features or [])})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distillation")
    g.add_argument("--teacher", required=True, metavar="DIR", help="model folder to distil (OUT/model of `fashionbert train`)")
    g.add_argument("--layers", type=int, required=True,
                   help="the student's encoder layers, 1 to the teacher's - 1; layer k starts as a copy of the last "
                        "teacher layer of the k-th of N equal blocks (6->2: teacher layers 2 and 5)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, as `fashionbert train`'s: checkpoints/, model/ (the student, an ordinary model "
                        "folder with its refitted score_fusion.json), metrics.jsonl, training_curves.png, summary.json")
    g.add_argument("--keep-recall", action=argparse.BooleanOptionalAction, default=D.keep_recall,
                   help="keep the teacher's layers, frozen, for the text-only and image-only passes (the recall "
                        "embeddings and the ranking score's cosine: once per item, not per pair) and distil only the "
                        "joint pass; --no-keep-recall: the N layers serve every pass (default --keep-recall)")
    g.add_argument("--features", action="append", metavar="DIR",
                   help="featurize output folder(s) to distil on (default: the ones the teacher trained on)")
    g.add_argument("--temperature", type=float, default=D.temperature,
                   help="temperature T of the TIA distributions kd_tia matches (default %(default)s)")
    g.add_argument("--tia-weight", type=float, default=D.tia_weight, help="weight of kd_tia (default %(default)s)")
    g.add_argument("--hidden-weight", type=float, default=D.hidden_weight,
                   help="weight of kd_hidden, the joint pass's layer outputs against the teacher's; 0 = off "
                        "(default %(default)s)")
    g.add_argument("--itc-weight", type=float, default=D.itc_weight,
                   help="weight of kd_itc, the in-batch similarity distributions (default %(default)s)")
    g.add_argument("--emb-weight", type=float, default=D.emb_weight,
                   help="weight of kd_emb, 1 - cosine to the teacher's itc vectors (default %(default)s)")
    g = parser.add_argument_group("data")
    g.add_argument("--val-fraction", type=float, default=None,
                   help="held-out fraction; default: the teacher's training run's (keep it: other products would be "
                        "ones the teacher trained on)")
    g.add_argument("--split-seed", type=int, default=None, help="salt of the held-out split; default: the teacher's")
    train_config.add_pair_arguments(g)
    train_config.add_schedule_arguments(parser)
    train_config.add_runtime_and_validation_arguments(parser)
