"""`RxTTrainer`: a Hugging Face `Trainer` whose loss is one of the curriculum's objectives (`training.py`).

An objective returns `(loss_sum, weight_sum, metrics)`. The trainer normalises by the weight summed over all
processes and gradient-accumulation steps, so a DDP run with the same global batch gives the same gradients as one
process (except for the two objectives that mix per-token means: see `RxTTrainer`). The objectives call the model
several times per batch (one decoder pass and one memory write per turn); DDP's reducer only syncs the gradients of
one wrapped `forward` call, so `RxTTrainer` averages the gradients across processes itself after `backward`.

Also refused here, when the trainer is made, rather than hours into a run: Trainer features that an objective would
silently skip, dataset columns Trainer would drop, and rows longer than the model's positions.
"""

from __future__ import annotations

import inspect
import logging
import re
import weakref
from collections.abc import Mapping, Sized
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from accelerate.data_loader import DataLoaderShard
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput, TrainOutput, unwrap_peft_model

from .modeling_rxt_wrappers import run_as_forward
from .training import COLLATOR_COLUMNS, Objective, episode_turns, lockstep, unpadded

logger = logging.getLogger(__name__)
_INITIAL_MEMORY = re.compile(r"(^|\.)initial_memory\.")  # its parameter, or PEFT's copies of it


@dataclass
class _AccumulatedStep:
    """The micro-batches of one optimizer step seen so far (more than one under gradient accumulation)."""

    scale: torch.Tensor | None = None  # what their losses are divided by before backward: the first one's weight
    weight: torch.Tensor | float = 0.0  # their weight, summed over micro-batches and processes
    loss_sum: torch.Tensor | float = 0.0  # this process's loss sum, for the log


@dataclass
class _StepCounts:
    """Optimizer steps since the last log (`window`) and in this `train` call (`run`), and those with a weighted
    answer among them."""

    window: int = 0
    window_weighted: int = 0
    run: int = 0
    run_weighted: int = 0

    def count(self, weighted: bool) -> None:
        self.window += 1
        self.run += 1
        self.window_weighted += weighted
        self.run_weighted += weighted


class _MetricMeans:
    """Plain means of the objective's metrics over batches (those with a weighted answer: the others have no loss),
    each over the batches that report it (a MoE's `aux_loss` only where a row read the memory)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor | float], weighted: bool) -> None:
        if not weighted:
            return
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self, across_processes_on: torch.device | None = None) -> dict[str, float]:
        """The means of this process's batches, or, given the device the processes reduce on, of every process's
        (all of them must call)."""
        names = sorted(self.sums)
        across_processes = across_processes_on is not None and _world_size() > 1
        if across_processes:
            gathered: list[list[str]] = [[] for _ in range(_world_size())]
            dist.all_gather_object(gathered, names)  # the processes may have seen different metrics
            names = sorted({name for names_of_one in gathered for name in names_of_one})
        totals = [self.sums.get(name, 0.0) for name in names] + [self.counts.get(name, 0) for name in names]
        if across_processes:
            reduced = torch.tensor(totals, dtype=torch.float64, device=across_processes_on)
            dist.all_reduce(reduced)
            totals = reduced.tolist()
        sums, counts = totals[: len(names)], totals[len(names) :]
        return {name: total / count for name, total, count in zip(names, sums, counts, strict=True) if count}


class RxTTrainer(Trainer):
    """A `Trainer` whose loss is `objective(model, inputs) -> (loss_sum, weight_sum, metrics)`.

    One optimizer step's gradient is that of `loss_sum / weight_sum`, both summed over the step's micro-batches and
    processes: the same whatever the split into processes and gradient-accumulation steps. The weight of the whole
    step is known only after its last micro-batch, so each micro-batch's backward divides by the first one's weight
    and the gradients are rescaled once, after the last (before clipping). Two objectives are exact only without a
    split: `external_and_memory_aware_objective` mixes its two per-token means within each micro-batch (see there),
    and `joint_objective` scales the masked-LM mean of each micro-batch, whose masks `InteractionCollator` draws from
    that micro-batch's ids; and a mixture of experts' load-balancing loss comes from each micro-batch's routing (as in
    transformers' MoE models). The metrics (stage losses, the MoE load-balancing loss) of the training batches are plain
    means over the logging window's micro-batches of this process, logged beside `loss` (which is token-weighted
    over the whole step and all processes). Evaluation reports them as well, beside `eval_loss` (`eval_<metric>`,
    plain means over the evaluation batches of every process), so that `metric_for_best_model` can name one."""

    loss_is_scaled_for_ga = True  # `training_step` normalises the whole step; the Trainer must not divide again

    def __init__(self, *args, objective: Objective, **kwargs) -> None:
        if not callable(objective):
            raise TypeError(f"`objective` must be callable, got {type(objective).__name__}")
        collator = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs).arguments.get("data_collator")
        super().__init__(*args, **kwargs)
        self._check_arguments_it_would_ignore()
        self._warn_if_grouped_by_turns()
        if collator is None:
            raise ValueError("RxTTrainer needs the stage's `data_collator` (InteractionCollator, EpisodeCollator, "
                             "ExternalMemoryCollator, ...): Trainer's default one cannot pad its rows")
        self._check_columns_are_kept(self.train_dataset, self.eval_dataset)
        self._check_rows_fit(train_dataset=self.train_dataset, eval_dataset=self.eval_dataset)
        if self.is_deepspeed_enabled and self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                "RxTTrainer normalises accumulated gradients itself, which DeepSpeed's engine does not let it do: "
                "use `gradient_accumulation_steps=1` with DeepSpeed (a larger per-device batch or more processes)."
            )
        self.objective = objective
        self._start_afresh()
        self._scaler_before_skipped_step: dict | None = None  # fp16: see `_skip_in_the_loss_scaler`
        self.add_callback(_AroundTheTrainingLoop(self))

    def _start_afresh(self) -> None:
        """No step, metrics or counts yet: at each start of the training loop (a `train` call, or transformers'
        retry with a smaller batch after an out-of-memory error, which does not call `train` again)."""
        self._step = _AccumulatedStep()
        self._metrics = _MetricMeans()  # of the training batches, until the next log
        self._eval_metrics = _MetricMeans()  # of the evaluation batches (`evaluation_loop` starts it afresh)
        self._steps = _StepCounts()

    def _issue_warnings_after_load(self, load_result) -> None:
        """Trainer warns of every key a checkpoint lacks, but the model saves a tied weight (the LM head, which is
        the embedding) once, under its source's name: those are tied again here, not missing. Other keys warn."""
        # `load_result` names keys of `self.model`, whose state dict Trainer loaded (a PEFT model loads otherwise)
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or ())
        missing = [key for key in load_result.missing_keys if key not in tied]
        if len(missing) < len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _check_arguments_it_would_ignore(self) -> None:
        """Trainer features that act on `forward`'s outputs or on `model.forward` itself: the objective computes its
        own loss over the model's parts, so they would be skipped without a word."""
        if self.compute_metrics is not None:
            raise ValueError("RxTTrainer evaluates the objective's loss only (`eval_loss`): `compute_metrics` would "
                             "never be called, since an objective's batch has no single output to compare")
        if self.compute_loss_func is not None:
            raise ValueError("RxTTrainer's loss is its `objective`: `compute_loss_func` would never be called; "
                             "pass your loss as `objective=`")
        if self.args.include_for_metrics:
            raise ValueError("RxTTrainer has no `compute_metrics` to give them to: `include_for_metrics` would keep "
                             "every evaluation batch's inputs, and episode batches of other shapes cannot be joined")
        if self.args.label_smoothing_factor:
            raise ValueError("RxTTrainer's objectives do not smooth labels: `label_smoothing_factor` would be ignored")
        if self.args.torch_compile:
            raise ValueError("`torch_compile` compiles `model.forward`, which RxTTrainer's objectives do not call "
                             "(they run the decoder, encoder and memory attention themselves): it would compile "
                             "nothing")
        if self.preprocess_logits_for_metrics is not None:
            raise ValueError("RxTTrainer's evaluation returns no logits (an objective's batch has no single output): "
                             "`preprocess_logits_for_metrics` would never be called")
        if not self.args.average_tokens_across_devices and self.args.world_size > 1:
            raise ValueError("RxTTrainer divides a step's loss by the weight of the tokens of every process (the "
                             "same gradients as one process with the whole batch): "
                             "`average_tokens_across_devices=False` would be ignored")

    def _warn_if_grouped_by_turns(self) -> None:
        """Length grouping (`group_by_length`, `batch_rebalance`) measures a row's `input_ids`, which for an episode
        row (a list of turns) is its number of turns, not of tokens, unless `length_column_name` names a column."""
        strategy, rows = self.args.train_sampling_strategy, self.train_dataset
        if strategy not in ("group_by_length", "batch_rebalance") or not isinstance(rows, Sized) or not len(rows):
            return
        if isinstance(rows, datasets.Dataset) and self.args.length_column_name in rows.column_names:
            return
        first = rows[0]
        ids = first.get("input_ids") if isinstance(first, Mapping) else None
        if getattr(ids, "ndim", None) == 2 or (isinstance(ids, list | tuple) and ids and not np.isscalar(ids[0])):
            logger.warning(f"`train_sampling_strategy={strategy!r}` measures episode rows by their number of turns: "
                           f"for their tokens, add a column of token counts and name it in `length_column_name` "
                           f"(now {self.args.length_column_name!r})")

    def _check_columns_are_kept(self, *datasets) -> None:
        """With `remove_unused_columns` (TrainingArguments' default), Trainer keeps only the dataset columns that
        `forward` takes, and the episode collators read others (`kinds`, the probes): refused here by name, where
        the collator would fail later blaming untokenised data. The columns are an Arrow dataset's, or the keys of
        the first row of other indexable datasets (a list of dicts, a torch Dataset), whose keys Trainer drops at
        collation. Run for the datasets given to `__init__` and for those `evaluate` and `predict` are given later."""
        if not self.args.remove_unused_columns:
            return
        self._set_signature_columns_if_needed()
        given = []
        for dataset in datasets:
            given += list(dataset.values()) if isinstance(dataset, dict) else [dataset]
        for dataset in given:
            dropped = sorted((_column_names(dataset) & COLLATOR_COLUMNS) - set(self._signature_columns))
            if dropped:
                raise ValueError(f"Trainer would drop the dataset columns {dropped}, which RxTTrainer's collators "
                                 "read: pass TrainingArguments(remove_unused_columns=False)")

    def _check_rows_fit(self, **named_datasets) -> None:
        """A row longer than the model's positions (tokenised with a larger `max_length`) would stop training at the
        batch that holds it, maybe hours in: refused here, naming the column. Read from the Arrow columns of the
        rows the Trainer will use (a `select` counts), without a pass in Python."""
        limit = self.model.config.max_position_embeddings
        for which, dataset in named_datasets.items():
            named = dataset.items() if isinstance(dataset, dict) else [(None, dataset)]  # a dict: several eval sets
            for key, rows in named:
                name = which if key is None else f"{which}[{key!r}]"
                # Only the stored rows of a plain Arrow set can be measured; a transform (`with_transform`) may
                # change them, and other datasets are checked batch by batch, as the model runs them.
                if not isinstance(rows, datasets.Dataset) or rows.format["type"] == "custom":
                    continue
                arrow = rows.with_format("arrow")
                for column in TOKEN_COLUMNS & set(rows.column_names):
                    if column == "input_ids" and "attention_mask" in rows.column_names:  # the collators drop padding
                        longest = _longest_kept(rows, arrow["attention_mask"])
                    else:
                        longest = _longest_token_list(arrow[column])
                    if longest > limit:
                        raise ValueError(
                            f"`{column}` of the {name} holds a row of {longest} tokens, more than the model's {limit} "
                            f"(`max_position_embeddings`): tokenize with `max_length={limit}` or less"
                        )

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        # PEFT's wrapper too: the objectives reach into the RxT model itself (`model.model.write_memory`, ...).
        rxt = unwrap_peft_model(self.accelerator.unwrap_model(model))
        # As a forward of the model Trainer holds: under FSDP2 its weights are gathered for the objective. FSDP's
        # mixed precision casts the float tensors a forward takes and returns (bf16): the batch goes in through a
        # closure and the weight and metrics come out beside the loss, so that they stay exact.
        results = {}

        def run_objective() -> torch.Tensor:
            results["loss_sum"], results["weight"], results["metrics"] = self.objective(rxt, inputs)
            return results["loss_sum"]

        # accelerate puts mixed precision (`bf16=True`) around `model.forward`, which the objective does not call.
        with lockstep(self._shards_over_processes()), self.accelerator.autocast():
            loss_sum = run_as_forward(model, run_objective)  # the loss's graph, through FSDP's backward hooks
        weight, metrics = results["weight"], results["metrics"]
        weighted = loss_sum.requires_grad and bool(weight > 0)  # in lockstep, a pass that weighs nothing has a graph
        if model.training and not loss_sum.requires_grad:
            # No row of this micro-batch had a weighted answer: backward must still run (under DDP every process
            # joins the gradient averaging), and gives no parameter a gradient, as if the micro-batch were not there.
            loss_sum = loss_sum.detach().requires_grad_()
        if not model.training:  # evaluation: each batch on its own, and kept out of the training metrics
            loss = self._evaluation_loss(loss_sum.detach(), weight.detach())
            # a batch of accelerate's filling only (see `_evaluation_loss`) is no batch of the set
            filling = _world_size() > 1 and self._batch_is_all_filling()
            self._eval_metrics.add(metrics, weighted=bool(weight > 0) and not filling)
            return (loss, metrics) if return_outputs else loss
        weight, world_size = weight.detach().clone(), _world_size()
        if world_size > 1:
            dist.all_reduce(weight)
        step = self._step
        if step.scale is None:
            step.scale = weight.clamp(min=1)  # any positive number would do: the rescaling in training_step corrects it
        step.weight = step.weight + weight
        step.loss_sum = step.loss_sum + results["loss_sum"].detach()
        self._metrics.add(metrics, weighted)  # a micro-batch without a weighted answer has no loss to log
        # DDP (and `_average_gradients`) average over processes: `* world_size` makes that a sum.
        loss = loss_sum / step.scale * world_size
        return (loss, metrics) if return_outputs else loss

    def _evaluation_loss(self, loss_sum: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The loss of an evaluation batch over the rows of every process, the same on each: Trainer repeats a
        process's loss for each of its rows and, in the last, short global batch, drops the rows accelerate filled it
        with (taken from the start of the set; they come last, so a process's batch beyond that count is filling).
        A process whose whole batch is filling counts nothing, which makes the loss that of one process over the same
        rows; filling inside a batch (a short batch of more than one row per process) still counts, as in a plain
        Trainer. A batch without a weighted answer has no loss: NaN, as a plain Trainer's batch without labels,
        which Trainer's `logging_nan_inf_filter` (default on) leaves out of `eval_loss` (a 0 would pull it down)."""
        totals = torch.stack((loss_sum.float(), weight.float()))
        if _world_size() > 1:
            if self._batch_is_all_filling():
                totals = totals * 0
            dist.all_reduce(totals)
        loss_sum, weight = totals.unbind()
        return loss_sum / weight if bool(weight > 0) else loss_sum.new_tensor(float("nan"))

    def _batch_is_all_filling(self) -> bool:
        """Whether every row of this process's evaluation batch is accelerate's filling of the last, short batch.
        Known where each process reads its own shard of the set (`DataLoaderShard`): the real rows come first in
        process order. Batches handed out by the main process (`dispatch_batches`) are split otherwise: their
        filling is counted, as in a plain Trainer."""
        state, loader = self.accelerator.gradient_state, self.accelerator.gradient_state.active_dataloader
        if not (isinstance(loader, DataLoaderShard) and state.end_of_dataloader and state.remainder > 0):
            return False
        rows = loader.total_batch_size // self.accelerator.num_processes  # per process
        return self.accelerator.process_index * rows >= state.remainder

    def _track_num_input_tokens(self, inputs) -> None:
        # `include_num_input_tokens_seen` looks for the batch's `input_ids`; the mixed external stage's batch holds
        # two batches (`ExternalAndEpisodeCollator`), both read by its objective: each is counted. So are an episode
        # batch's recall probes, which the decoder reads beside the turns (not the filler row of turn -1: none does).
        if self.args.include_num_input_tokens_seen == "no":  # nothing counted: no indexing either (a host sync)
            return
        parts = [part for part in inputs.values() if isinstance(part, Mapping)] if "input_ids" not in inputs else []
        for part in parts or [inputs]:
            super()._track_num_input_tokens(part)
            if "probe_input_ids" in part:
                read = part["probe_turns"] >= 0
                super()._track_num_input_tokens({"input_ids": part["probe_input_ids"][read],
                                                 "attention_mask": part["probe_attention_mask"][read]})

    def get_decay_parameter_names(self, model) -> list[str]:
        # The learned initial memory is a state the decoder reads, not a weight matrix: AdamW's weight decay would
        # pull the memory every conversation starts from towards zero. Kept out, as norms and biases are.
        return [name for name in super().get_decay_parameter_names(model) if not _INITIAL_MEMORY.search(name)]

    def get_eval_dataloader(self, eval_dataset=None):
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # a str names one of `__init__`'s
            self._check_columns_are_kept(eval_dataset)
            self._check_rows_fit(eval_dataset=eval_dataset)
        return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        self._check_columns_are_kept(test_dataset)
        self._check_rows_fit(test_dataset=test_dataset)
        return super().get_test_dataloader(test_dataset)

    def _shards_over_processes(self) -> bool:
        """Whether several processes gather the model's weights from each other at every module call (FSDP,
        DeepSpeed ZeRO-3): the objectives must then make the same calls on every process (`lockstep`)."""
        if _world_size() < 2:
            return False
        if self.is_deepspeed_enabled:
            return self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return self.is_fsdp_enabled

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """Evaluation is the objective's loss on the batch, as in training. Trainer's own step would look for a
        top-level `labels` and, without one (the external-memory batches), call `forward` instead of the objective.
        No logits are returned: an objective's batch has no single output to compare with labels."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)  # forward and backward of one micro-batch
        if not self.accelerator.sync_gradients:  # more micro-batches to come: the log gets the step's loss at the end
            return loss.new_zeros(())
        step, self._step = self._step, _AccumulatedStep()
        rxt = self.accelerator.unwrap_model(model)
        world_size = _world_size()
        self._steps.count(weighted=bool(step.weight > 0))
        if not bool(step.weight > 0):
            # No process had a weighted answer in this step. In lockstep their passes that weigh nothing gave
            # gradients of zero, on which AdamW's momentum would still move the weights: as without lockstep, the
            # step has no gradients at all, and the optimizer leaves the weights alone.
            rxt.zero_grad(set_to_none=True)
            self._skip_in_the_loss_scaler()
            return loss.new_zeros(())  # no loss: `log` takes the mean over the other steps
        # FSDP has reduce-scattered the gradients already, and DeepSpeed's engine averaged them in its backward.
        if world_size > 1 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            _average_gradients(rxt)
        weight = step.weight.clamp(min=1e-8)
        if not torch.equal(step.scale, weight):  # gradients hold sum(d loss_sum) / scale; make it / weight
            gradients = [p.grad for p in rxt.parameters() if p.grad is not None]
            if gradients:
                torch._foreach_mul_(gradients, (step.scale / weight).item())
        return step.loss_sum / weight * world_size

    def _skip_in_the_loss_scaler(self) -> None:
        """fp16's GradScaler refuses an optimizer step without gradients ("No inf checks were recorded"). The step is
        given one non-finite gradient instead, on a parameter the optimizer holds, which the scaler skips (its
        documented overflow rule); the scaler's state (the scale, which an overflow halves, and its growth count)
        is put back after the step (`_AroundTheTrainingLoop`). The step logs a `grad_norm` of inf."""
        scaler = self.accelerator.scaler
        if scaler is None or not scaler.is_enabled():
            return
        self._scaler_before_skipped_step = scaler.state_dict()
        held = (p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad)
        first = next(held)
        first.grad = torch.full_like(first, float("inf"))

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        # transformers 5.23 resumes a checkpoint saved at `max_steps` inside an epoch by running one step more: it
        # checks the step count only after a step. No batches there: the epoch ends, and the run, with no step.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def train(self, *args, **kwargs) -> TrainOutput:
        output = super().train(*args, **kwargs)
        if self._steps.run and not self._steps.run_weighted:
            logger.warning("no step of this run had a weighted answer, so nothing was trained: do the collator's "
                           "kind weights give the data's turn kinds a weight?")
        return TrainOutput(output.global_step, output.metrics["train_loss"], output.metrics)  # as `log` corrected it

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """Trainer's loop, with the objective's metrics of its batches (`eval_decoder_loss`, ...) beside its loss."""
        self._eval_metrics = _MetricMeans()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        means = self._eval_metrics.means(across_processes_on=self.args.device)
        output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in means.items()})
        return output

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._metrics.means())
            self._metrics = _MetricMeans()
        # Trainer averages the losses `training_step` returned over every step; a step without a weighted answer
        # has none (it returned 0), so the mean is taken over the other steps: NaN where there were none.
        counts = self._steps
        if "loss" in logs:
            weighted = counts.window_weighted
            logs["loss"] = logs["loss"] * counts.window / weighted if weighted else float("nan")
            counts.window = counts.window_weighted = 0
        if "train_loss" in logs:  # at the end of `train`: over the steps of this call
            weighted = counts.run_weighted
            logs["train_loss"] = self._total_loss_scalar / weighted if weighted else float("nan")
        super().log(logs, *args, **kwargs)


class _AroundTheTrainingLoop(TrainerCallback):
    """What `RxTTrainer` does where transformers' training loop starts and after each optimizer step."""

    def __init__(self, trainer: RxTTrainer) -> None:
        self.trainer = weakref.ref(trainer)  # not a cycle: `del trainer` still frees the model and optimizer at once

    def on_train_begin(self, args, state, control, **kwargs):
        # A run starts from nothing: an earlier attempt's (an interrupted one's) step and metrics are not its own.
        self.trainer()._start_afresh()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer()
        if trainer._scaler_before_skipped_step is not None:  # the scaler backed off for the step it skipped
            trainer.accelerator.scaler.load_state_dict(trainer._scaler_before_skipped_step)
            trainer._scaler_before_skipped_step = None


def _column_names(dataset) -> set[str]:
    """An Arrow dataset's columns, else the keys of the first row of an indexable one (none for an iterable)."""
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return set(names)
    try:
        first = dataset[0] if len(dataset) else None
    except (TypeError, KeyError, IndexError, NotImplementedError):
        return set()
    return set(first) if isinstance(first, Mapping) else set()


# The token-id columns the collators feed to the model: an interaction (B, T), or per turn (B, turns, T).
TOKEN_COLUMNS = {"input_ids", "probe_input_ids"}


def _longest_kept(rows: datasets.Dataset, masks: pa.ChunkedArray) -> int:
    """The most tokens of one row (or turn) the collators keep: those its `attention_mask` marks 1, all of them where
    a row's or a turn's mask is null. Read from the Arrow mask column, or row by row where it holds nulls."""
    if not _holds_nulls(masks):
        return _longest_token_list(masks, count_nonzero=True)
    plain = rows.select_columns(["input_ids", "attention_mask"]).with_format(None)  # Python lists
    return max((n for row in plain for n in _kept_lengths(row)),
               default=0)


def _holds_nulls(column: pa.ChunkedArray | pa.Array) -> bool:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    while True:
        if column.null_count:
            return True
        if not _is_list(column.type):
            return False
        column = pc.list_flatten(column)


def _kept_lengths(row: Mapping) -> list[int]:
    """Each interaction's (or turn's) token count, by the collators' own rule (`unpadded`, `episode_turns`)."""
    row = {**row, "labels": row["input_ids"]}  # the rule keeps labels beside the ids; these are not read
    if row["input_ids"] and isinstance(row["input_ids"][0], list):  # an episode: one list per turn
        return [len(ids) for ids, _ in episode_turns(row)]
    return [len(unpadded(row["input_ids"], row["labels"], row["attention_mask"])[0])]


def _longest_token_list(column: pa.ChunkedArray | pa.Array, count_nonzero: bool = False) -> int:
    """The longest innermost list of an Arrow list column (list<int> or list<list<int>>), or with `count_nonzero`
    the most non-zero values of one (a mask's kept tokens); 0 if it has none (or is no list column: the collator
    names that)."""
    if not _is_list(column.type):
        return 0
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    while _is_list(column.type.value_type):
        column = pc.list_flatten(column)
    if not count_nonzero:
        return pc.max(pc.list_value_length(column)).as_py() or 0
    kept = pc.not_equal(pc.list_flatten(column), 0).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
    return int(np.bincount(parents[kept], minlength=1).max())


def _is_list(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _average_gradients(model: torch.nn.Module) -> None:
    """All-reduce (mean) every gradient across processes, in one flat buffer. A parameter that got no gradient on
    this process (e.g. no row of its share of the batch reached it) joins with zeros if any other process has one,
    so every process reduces the same layout and ends with the same gradients."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    # On the gradients' device: NCCL (multi-GPU DDP) reduces CUDA tensors only.
    has_grad = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32,
                            device=parameters[0].device if parameters else None)
    dist.all_reduce(has_grad)
    reduced = [p for p, flag in zip(parameters, has_grad.tolist(), strict=True) if flag > 0]
    if not reduced:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in reduced])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for parameter in reduced:
        parameter.grad = flat[offset : offset + parameter.numel()].view_as(parameter).clone()
        offset += parameter.numel()


__all__ = ["RxTTrainer"]
