"""LoRA finetuning of the decoder on compressed contexts: loss on answer tokens only.

The trainer reads each :class:`~lloco_index.finetune.data.TrainExample` through the same
:class:`~lloco_index.generation.SoftPromptReader` that answers queries: ``render`` applies the chat
template, ``prepare`` embeds the text pieces and splices the stored soft prompts in. The assistant's
answer (as the chat template closes it, e.g. ``Paris.<|im_end|>``) is appended as token embeddings and
is the only thing the loss sees. Only the new adapter's LoRA matrices train; the decoder, the compressor
and the soft prompts stay frozen.

>>> finetuner = LoRAFinetuner(llm.reader, train, val, adapter_name="legal", output_dir="adapters/legal")
>>> result = finetuner.train()            # resumes from adapters/legal/training/checkpoints if present
>>> llm.complete(prompt, adapter="legal")

Runs are resumable and exact: adapter weights, AdamW state, the RNG (LoRA dropout), the step counter,
the best validation loss and the history are checkpointed atomically; the data order of every epoch is a
function of (seed, epoch), and the learning rate a function of the step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..adapters import write_adapter_metadata
from ..fileio import atomic_write_bytes
from ..errors import ContextBudgetError, LLoCOError
from ..generation import SoftPromptReader
from ..precision import autocast
from ..training.checkpoint import CheckpointDir, rng_state, set_rng_state
from ..training.loop import AfterStep, StepStats, TrainLoop
from ..training.schedule import lr_multiplier
from .config import FinetuneConfig
from .data import Message, TrainExample, examples_hash

logger = logging.getLogger(__name__)

IGNORE = -100
TRAINING_SUBDIR = "training"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class FinetuneResumeError(LLoCOError):
    """The output directory holds a run with other data or settings."""


@dataclass
class FinetuneResult:
    """What a (possibly partial) finetuning run did."""

    adapter_dir: Path
    adapter_name: str
    finished: bool  # False: stopped by ``stop_after_steps``; call train() again to resume
    stopped_early: bool
    step: int
    total_steps: int
    best_step: int
    initial_val_loss: Optional[float]
    best_val_loss: Optional[float]
    train_examples: int
    val_examples: int
    train_seconds: float
    positions_per_second: float  # decoder positions (prompt + answer) forward+backward per second
    answer_tokens_per_second: float
    adapter_bytes: int
    data_hash: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        out["adapter_dir"] = str(self.adapter_dir)
        return out


# ------------------------------------------------------------------ targets
def target_token_ids(reader: SoftPromptReader, messages: Sequence[Message], target: str, max_tokens: int) -> list[int]:
    """Token ids the model must produce after the rendered prompt (:meth:`SoftPromptReader.answer_ids`)."""
    return reader.answer_ids(messages, target, max_tokens)


@dataclass
class _Encoded:
    embeds: torch.Tensor  # [T, H]
    labels: torch.Tensor  # [T], IGNORE on the prompt


# ------------------------------------------------------------------ trainer
class LoRAFinetuner:
    """Train one named LoRA adapter on the decoder of ``reader.backbone``.

    Args:
        reader: the reader the LLM answers with (``LLoCOLLM.reader``): same chat template, system prompt
            and soft-prompt store as at query time.
        train, val: examples (``val`` may be empty: then no early stopping, the last adapter is kept).
        adapter_name: the name the adapter is loaded under (and selected with ``adapter=...``).
        output_dir: the adapter directory (peft format + ``lloco_adapter.json``); training state lives in
            ``output_dir/training/``.
        config: hyper-parameters (:class:`FinetuneConfig`).
        extra_metadata: recorded in ``lloco_adapter.json`` (e.g. the data source).
    """

    def __init__(
        self,
        reader: SoftPromptReader,
        train: Sequence[TrainExample],
        val: Sequence[TrainExample] = (),
        *,
        adapter_name: str,
        output_dir: Union[str, Path],
        config: Optional[FinetuneConfig] = None,
        progress: bool = True,
        extra_metadata: Optional[dict[str, Any]] = None,
    ):
        if reader.compressor is None:
            raise ValueError("The reader needs its compressor (adapter metadata records its fingerprint).")
        self.reader = reader
        self.compressor = reader.compressor
        self.backbone = reader.backbone
        self.config = config or FinetuneConfig()
        self.adapter_name = adapter_name
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.extra_metadata = dict(extra_metadata or {})
        c = self.compressor
        reserved = {"lloco_compressor", getattr(c, "encoder_adapter", None), getattr(c, "reader_adapter_name", None),
                    c.reader_adapter}
        if adapter_name in reserved or self.backbone.adapter_holder(adapter_name) is not None:
            raise ValueError(f"Adapter name '{adapter_name}' is taken by the compressor; choose another name.")
        self.train_examples = self._fit(list(train), "train")
        self.val_examples = self._fit(list(val), "validation")
        if not self.train_examples:
            raise ValueError("No training examples (after dropping those that do not fit the context window).")
        self.data_hash = examples_hash(self.train_examples + self.val_examples)
        self._targets = {e.id: target_token_ids(reader, e.messages, e.target, self.config.max_target_tokens)
                         for e in self.train_examples + self.val_examples}
        self.checkpoints = CheckpointDir(self.output_dir / TRAINING_SUBDIR / "checkpoints")
        self._params: list[torch.nn.Parameter] = []

    # ------------------------------------------------------------- sizes
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_examples) / self.config.examples_per_step)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.config.warmup_ratio * self.total_steps)

    @property
    def eval_every(self) -> int:
        return self.config.eval_every or max(1, self.steps_per_epoch // 2)

    def _fit(self, examples: list[TrainExample], split: str) -> list[TrainExample]:
        """Drop examples whose prompt + answer exceed the decoder's window (they could never be answered)."""
        kept = []
        limit = self.backbone.context_window
        for e in examples:
            try:
                positions = self.reader.count_positions(self.reader.render(e.messages)) + self.config.max_target_tokens
            except KeyError as exc:  # an unknown placeholder: the data does not belong to this store
                raise ContextBudgetError(f"{split} example {e.id}: {exc}") from exc
            if positions <= limit:
                kept.append(e)
        if len(kept) < len(examples):
            logger.warning("Dropped %d %s examples longer than the %d-position window.", len(examples) - len(kept), split, limit)
        return kept

    # ----------------------------------------------------------- adapter
    def _setup_adapter(self) -> None:
        """(Re)create the adapter: a fresh LoRA, or a copy of the compressor's reader adapter."""
        from peft import LoraConfig

        backbone, name, cfg = self.backbone, self.adapter_name, self.config
        if backbone.has_adapter(name):  # a previous run in this process: start from scratch (or the checkpoint)
            backbone.delete_adapter(name)
        torch.manual_seed(cfg.seed)  # LoRA's A init, then dropout, draw from the global generator
        reader_name = self.compressor.reader_adapter if cfg.init_from_reader else None
        if reader_name:
            lora = copy.deepcopy(backbone.peft_model.peft_config[reader_name])
            lora.inference_mode = False
            backbone.add_adapter(name, lora)
            backbone.set_adapter_state_dict(name, backbone.adapter_state_dict(reader_name))
            self.init_from = f"reader:{reader_name}"
        else:
            backbone.add_adapter(name, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                  target_modules=list(cfg.lora_targets), bias="none"))
            self.init_from = "fresh"
        marker = f".{name}."
        self._named_params = sorted((n, p) for n, p in backbone.peft_model.named_parameters() if marker in n)
        self._params = [p for _, p in self._named_params]

    @contextlib.contextmanager
    def _training_mode(self):
        """Only this adapter's parameters require grad, dropout on; everything restored afterwards."""
        peft_model = self.backbone.peft_model
        flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
        was_training = self.backbone.base_model.training
        try:
            for p in peft_model.parameters():
                p.requires_grad_(False)
            for p in self._params:
                p.requires_grad_(True)
            self.backbone.base_model.train()
            yield
        finally:
            for n, p in peft_model.named_parameters():
                p.requires_grad_(flags.get(n, False))
            self.backbone.base_model.train(was_training)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.backbone.adapter_state_dict(self.adapter_name).items()}

    # ------------------------------------------------------------- loss
    def _encode(self, example: TrainExample) -> _Encoded:
        target = self._targets[example.id]
        prepared = self.reader.prepare(example.messages, max_new_tokens=len(target))
        table = self.backbone.embedding_table()
        with torch.no_grad():
            answer = table(torch.tensor(target, device=table.weight.device))
        embeds = torch.cat([prepared.inputs_embeds[0], answer], dim=0)
        labels = torch.full((embeds.shape[0],), IGNORE, dtype=torch.long, device=embeds.device)
        labels[prepared.positions:] = torch.tensor(target, device=embeds.device)
        return _Encoded(embeds, labels)

    def _autocast(self):
        return autocast(self.backbone.device, self.config.dtype)

    def _loss_sum(self, examples: Sequence[TrainExample], adapter: Optional[str]) -> tuple[torch.Tensor, int, int]:
        """Summed answer-token cross-entropy over a micro-batch, its answer tokens and its positions."""
        encoded = [self._encode(e) for e in examples]
        width = max(e.embeds.shape[0] for e in encoded)
        hidden_size = encoded[0].embeds.shape[1]
        device = encoded[0].embeds.device
        embeds = torch.zeros(len(encoded), width, hidden_size, dtype=encoded[0].embeds.dtype, device=device)
        labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long, device=device)
        mask = torch.zeros(len(encoded), width, dtype=torch.long, device=device)
        for i, e in enumerate(encoded):  # right padding: positions of real tokens are unchanged
            n = e.embeds.shape[0]
            embeds[i, :n], labels[i, :n], mask[i, :n] = e.embeds, e.labels, 1
        with self.backbone.using(adapter) as model, self._autocast():
            hidden = model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            # Only the positions that predict an answer token go through the 49k-way head.
            shifted = labels[:, 1:]
            select = shifted != IGNORE
            logits = model.lm_head(hidden[:, :-1][select])
        loss = torch.nn.functional.cross_entropy(logits.float(), shifted[select], reduction="sum")
        return loss, int(select.sum()), int(mask.sum())

    @torch.no_grad()
    def evaluate_loss(self, examples: Optional[Sequence[TrainExample]] = None, *, adapter: Optional[str] = "self") -> float:
        """Mean answer-token loss (nats) of ``examples`` (default: validation) with ``adapter``.

        ``adapter="self"`` is the adapter being trained; ``None`` the plain decoder; any loaded name works.
        """
        examples = self.val_examples if examples is None else list(examples)
        if not examples:
            return float("nan")
        name = self.adapter_name if adapter == "self" else adapter
        missing = [e for e in examples if e.id not in self._targets]
        for e in missing:
            self._targets[e.id] = target_token_ids(self.reader, e.messages, e.target, self.config.max_target_tokens)
        was_training = self.backbone.base_model.training
        self.backbone.base_model.eval()  # no dropout while measuring
        try:
            total, tokens = 0.0, 0
            for i in range(0, len(examples), self.config.micro_batch_size):
                loss, n, _ = self._loss_sum(examples[i : i + self.config.micro_batch_size], name)
                total += float(loss)
                tokens += n
        finally:
            self.backbone.base_model.train(was_training)
        return total / max(tokens, 1)

    # -------------------------------------------------------- schedule
    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then the configured decay."""
        cfg, total = self.config, self.total_steps
        return cfg.learning_rate * lr_multiplier(step, total_steps=total, warmup_steps=self.warmup_steps,
                                                 schedule=cfg.lr_schedule)

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    # ----------------------------------------------------------- state
    def _fresh_state(self) -> dict[str, Any]:
        return {"step": 0, "best_step": 0, "best_val_loss": None, "initial_val_loss": None, "bad_evals": 0,
                "stopped_early": False, "finished": False, "train_seconds": 0.0, "positions": 0, "answer_tokens": 0,
                "history": [], "data_hash": self.data_hash, "config_hash": self.config.training_hash(),
                "adapter_name": self.adapter_name}

    def _save_checkpoint(self, state: dict[str, Any], optimizer: torch.optim.Optimizer, best: dict[str, torch.Tensor]) -> None:
        self.checkpoints.save(state["step"], tensors={"adapter": self.adapter_state(), "best_adapter": best},
                              objects={"optimizer": optimizer.state_dict(), "rng": rng_state()}, state=state)

    def _check_resumable(self, state: dict[str, Any]) -> None:
        for key, mine in (("data_hash", self.data_hash), ("config_hash", self.config.training_hash()),
                          ("adapter_name", self.adapter_name)):
            if state.get(key) != mine:
                raise FinetuneResumeError(
                    f"'{self.output_dir}' holds a finetuning run with another {key.replace('_', ' ')} "
                    f"({state.get(key)} != {mine}). Resume it with the same data and settings, pick another "
                    f"output_dir, or pass overwrite=True to start over.")

    # ------------------------------------------------------------ train
    def train(self, *, stop_after_steps: Optional[int] = None, overwrite: bool = False) -> FinetuneResult:
        """Train (or resume) until the last epoch or early stopping; publish the best adapter.

        ``stop_after_steps``: return after that many optimizer steps in this call, with a checkpoint
        written (``finished=False``); a later ``train()`` resumes exactly where it stopped.
        """
        if overwrite:
            self.checkpoints.clear()
        self._setup_adapter()
        cfg = self.config
        optimizer = torch.optim.AdamW(self._params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        loop = TrainLoop(optimizer, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                         lr_schedule=cfg.lr_schedule, max_grad_norm=cfg.max_grad_norm,
                         checkpoint_every=cfg.checkpoint_every, desc=f"finetune {self.adapter_name}",
                         progress=self.progress)
        checkpoint = self.checkpoints.load_latest()
        if checkpoint is not None:
            state = checkpoint.state
            self._check_resumable(state)
            self.backbone.set_adapter_state_dict(self.adapter_name, checkpoint.tensors["adapter"])
            best = checkpoint.tensors["best_adapter"]
            optimizer.load_state_dict(checkpoint.objects["optimizer"])
            set_rng_state(checkpoint.objects["rng"])
            logger.info("Resuming %s at step %d/%d", self.adapter_name, state["step"], self.total_steps)
        else:
            state = self._fresh_state()
            best = self.adapter_state()
            if self.val_examples:  # the starting point: what the decoder (or reader adapter) already does
                state["initial_val_loss"] = state["best_val_loss"] = self.evaluate_loss()
                state["history"].append({"step": 0, "val_loss": state["initial_val_loss"]})
        if not state["finished"]:
            best = self._train_loop(state, loop, best, stop_after_steps)
        if state["finished"]:
            self.backbone.set_adapter_state_dict(self.adapter_name, best)
            self._publish(state)
        for p in self._params:
            p.requires_grad_(False)
        return self._result(state)

    def _train_loop(self, state: dict[str, Any], loop: TrainLoop, best: dict[str, torch.Tensor],
                    stop_after_steps: Optional[int]) -> dict[str, torch.Tensor]:
        cfg = self.config
        per_step, steps_per_epoch = cfg.examples_per_step, self.steps_per_epoch
        kept = {"best": best}

        def train_step(step: int) -> dict[str, Any]:
            """The gradients of optimizer step ``step``: its examples' answer-token loss, token-weighted."""
            epoch, k = divmod(step, steps_per_epoch)
            order = self.epoch_order(epoch)
            group = [self.train_examples[i] for i in order[k * per_step : (k + 1) * per_step]]
            n_tokens = sum(len(self._targets[e.id]) for e in group)
            step_loss, positions = 0.0, 0
            for i in range(0, len(group), cfg.micro_batch_size):
                loss, _, pos = self._loss_sum(group[i : i + cfg.micro_batch_size], self.adapter_name)
                # Token-weighted mean over the whole accumulated group, so accumulation = one big batch.
                (loss / n_tokens).backward()
                step_loss += float(loss.detach())
                positions += pos
            return {"epoch": epoch, "loss": step_loss / n_tokens, "positions": positions, "answer_tokens": n_tokens}

        def after_step(done: int, out: dict[str, Any], stats: StepStats) -> AfterStep:
            state["train_seconds"] += stats.seconds
            state["positions"] += out["positions"]
            state["answer_tokens"] += out["answer_tokens"]
            state["step"] = done
            record: dict[str, Any] = {"step": done, "epoch": out["epoch"], "lr": stats.lrs[0], "train_loss": out["loss"]}
            evaluated = self._maybe_validate(state, record)
            if evaluated and state["best_step"] == done:
                kept["best"] = self.adapter_state()
            state["history"].append(record)
            if done >= self.total_steps or state["stopped_early"]:
                state["finished"] = True
                if not self.val_examples:  # nothing to select on: the last adapter is the result
                    kept["best"], state["best_step"] = self.adapter_state(), done
            val = state["best_val_loss"]
            return AfterStep(postfix=dict(loss=f"{out['loss']:.3f}", val=f"{val:.3f}" if val is not None else "-"),
                             checkpoint=evaluated, finished=state["finished"])

        end = self.total_steps if stop_after_steps is None else min(self.total_steps, state["step"] + stop_after_steps)
        with self._training_mode():
            loop.run(state["step"], end, train_step, after_step,
                     save=lambda _done: self._save_checkpoint(state, loop.optimizer, kept["best"]))
        return kept["best"]

    def _maybe_validate(self, state: dict[str, Any], record: dict[str, Any]) -> bool:
        last = state["step"] >= self.total_steps
        if not self.val_examples or not (state["step"] % self.eval_every == 0 or last):
            return False
        val = self.evaluate_loss()
        record["val_loss"] = val
        if state["best_val_loss"] is None or val < state["best_val_loss"] - self.config.min_delta:
            state["best_val_loss"], state["best_step"], state["bad_evals"] = val, state["step"], 0
        else:
            state["bad_evals"] += 1
            if self.config.patience and state["bad_evals"] >= self.config.patience:
                state["stopped_early"] = True
                logger.info("Early stop at step %d: no validation improvement in %d evaluations (best %.4f at step %d).",
                            state["step"], state["bad_evals"], state["best_val_loss"], state["best_step"])
        return True

    # ---------------------------------------------------------- publish
    def _publish(self, state: dict[str, Any]) -> None:
        """Write the adapter (peft files, then ``lloco_adapter.json``) into ``output_dir``, each file atomically."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.output_dir, prefix=".publish-"))
        try:
            self.backbone.peft_model.save_pretrained(str(tmp), selected_adapters=[self.adapter_name],
                                                     save_embedding_layers=False)
            source = tmp / self.adapter_name if (tmp / self.adapter_name).is_dir() else tmp
            for name in ADAPTER_FILES:
                os.replace(source / name, self.output_dir / name)
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        result = self._result(state)
        write_adapter_metadata(
            self.output_dir, self.compressor, data_hash=self.data_hash, adapter_name=self.adapter_name,
            init_from=self.init_from, training=self.config.to_dict(), metrics=result.metrics(), **self.extra_metadata)
        atomic_write_bytes(self.output_dir / TRAINING_SUBDIR / "history.json",
                           json.dumps(state["history"], indent=1).encode())

    def _result(self, state: dict[str, Any]) -> FinetuneResult:
        seconds = state["train_seconds"]
        size = sum((self.output_dir / f).stat().st_size for f in ADAPTER_FILES if (self.output_dir / f).is_file())
        return FinetuneResult(
            adapter_dir=self.output_dir, adapter_name=self.adapter_name, finished=state["finished"],
            stopped_early=state["stopped_early"], step=state["step"], total_steps=self.total_steps,
            best_step=state["best_step"], initial_val_loss=state["initial_val_loss"], best_val_loss=state["best_val_loss"],
            train_examples=len(self.train_examples), val_examples=len(self.val_examples), train_seconds=seconds,
            positions_per_second=state["positions"] / seconds if seconds else 0.0,
            answer_tokens_per_second=state["answer_tokens"] / seconds if seconds else 0.0,
            adapter_bytes=size, data_hash=self.data_hash, history=list(state["history"]))
