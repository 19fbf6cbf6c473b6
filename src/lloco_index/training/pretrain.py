"""The compressor pretraining loop (framework-free: plain PyTorch).

``pretrain(PretrainConfig(...))`` builds (or resumes) an ICAE-style compressor
on a decoder, optionally with a trainable reader LoRA, and trains it on a mix of
objectives (:mod:`.objectives`) over token windows of the training splits.
``method="autocompressor"`` trains an AutoCompressor instead: one LoRA that both
writes and reads recursive summaries, on its own objective (``ac``,
:mod:`.recursive`), exported with the LoRA merged into a decoder copy.
bf16 autocast, AdamW with per-group learning rates, warmup + cosine/linear
schedule, gradient accumulation, optional gradient checkpointing, a curriculum
over segment length and ratio, atomic checkpoints every N steps, a held-out
evaluation with control lines every M steps, and a tqdm bar with loss,
tokens/s and ETA. Metrics go to ``<run_dir>/metrics.jsonl``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .. import defaults
from ..backbone import Backbone
from ..compressors.autocompressor import AutoCompressor, AutoCompressorConfig
from ..compressors.icae import ICAECompressor, ICAEConfig
from ..generation import SoftPromptReader
from ..models import select_device
from . import checkpoint as ckpt
from .data import (
    TRAIN_SOURCES,
    Window,
    WindowSampler,
    load_documents,
    load_text_documents,
    load_qa_jsonl,
    load_squad_qa,
    make_windows,
    shorten,
    tokenize_documents,
)
from .evaluate import evaluate_compressor, held_out_windows
from .model_card import describe_machine
from .objectives import ObjectiveMix, mixed_loss, qa_example, window_example
from .query_data import QueryExample, load_query_examples
from .query_loss import DistillWeights, chunk_segments, distill_loss
from .recursive import recursive_lm_loss, split_segments
from .loop import AfterStep, StepStats, TrainLoop
from .schedule import check_schedule
from .vocabulary import upgrade_names


@dataclass
class PretrainConfig:
    """Everything that defines a run; saved in ``<run_dir>/config.json`` and in every checkpoint."""

    run_dir: str
    data_dir: str = field(default_factory=lambda: str(defaults.data_dir()))
    sources: list[str] = field(default_factory=lambda: list(TRAIN_SOURCES))
    # Your own text instead of the shared data: a .txt file, a .jsonl file ('text' per line) or a folder of them.
    # Every tenth document (at least one, when there are two or more) is held out for the evaluations.
    text: Optional[str] = None
    decoder: Optional[str] = None  # None: the embedded SmolLM2-135M-Instruct
    # None: lloco_index.models.select_device ($LLOCO_DEVICE, else a GPU when there is one, else the CPU).
    # Older run configs record "cpu" here; resuming them is unaffected: the field is not compared.
    device: Optional[str] = None
    # --- compressor
    method: str = "icae"  # "icae" (encoder LoRA + pooling or memory tokens) or "autocompressor" (recursive summaries)
    ac_segments: int = 2  # autocompressor: consecutive segments per "ac" example (the recursion depth)
    pooling: str = "mean"  # "mean" (window mean-pooling) or "memory" (ICAE memory tokens)
    segment_length: int = defaults.DEFAULT_SEGMENT_LENGTH
    n_slots: int = defaults.DEFAULT_N_SLOTS  # slots per full segment: ratio = segment_length / n_slots
    pool_layer: Optional[int] = None  # read encoder states after this many layers (None: last layer)
    lora_r: int = 16
    lora_alpha: int = 32
    init_projection: str = "identity"  # "identity" or "lstsq" (fit hidden -> token embedding at 1x first)
    init_from: Optional[str] = None  # a compressor directory to start from
    # --- reader
    reader: bool = True  # train a reader LoRA on the decoder (False: frozen decoder, ICAE)
    reader_r: int = 16
    reader_alpha: int = 32
    # --- objectives
    objectives: dict[str, float] = field(default_factory=lambda: {"lm": 0.4, "kl": 0.4, "ae": 0.2})
    continuation_length: int = 128
    qa_file: Optional[str] = None  # JSONL of QA examples for "qa" (default: SQuAD train gold answers)
    kl_temperature: float = 1.0
    # "distill" (query-path distillation, .query_loss): query-shaped examples written by .query_data
    distill_file: Optional[str] = None
    # Who the compressed reader learns from, reading the text: "init_reader" (a frozen copy of --init-from's
    # reader adapter), "base" (the decoder without adapters), or an adapter directory.
    teacher: str = "init_reader"
    distill_kl: float = 1.0  # weight of KL(teacher || student) on the answer tokens
    distill_ce: float = 0.5  # weight of the gold answer's cross-entropy
    distill_hidden: float = 0.0  # weight of the last-hidden-state distance on the answer tokens
    # Projector warm-up: for the first N steps the encoder LoRA is frozen and each segment's pooled features
    # are computed once and cached, so a step costs one decoder pass (the projection and reader train).
    freeze_encoder_steps: int = 0
    # --- optimisation
    steps: int = 1000
    batch_size: int = 4
    grad_accum_steps: int = 1
    learning_rate: float = 3e-4  # encoder LoRA
    reader_lr: Optional[float] = None  # default: learning_rate
    head_lr: float = 3e-3  # projection (+ memory tokens): new parameters learn faster
    weight_decay: float = 0.0
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    # curriculum: [[from_step, value], ...]; the last entry whose step has been reached applies
    segment_curriculum: list[list[int]] = field(default_factory=list)  # segment length in tokens
    slots_curriculum: list[list[int]] = field(default_factory=list)  # n_slots per full segment (ratio)
    chunks_curriculum: list[list[int]] = field(default_factory=list)  # autocompressor: segments per "ac" example
    # --- bookkeeping
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    eval_every: int = 50
    eval_windows: int = 16
    eval_segment_length: Optional[int] = None  # default: segment_length
    eval_continuation_length: int = 64
    eval_qa: int = 0  # QA questions per eval (0: none; generation is slow on CPU)
    threads: Optional[int] = None

    @property
    def ratio(self) -> float:
        return self.segment_length / self.n_slots

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        """A saved config (``config.json``, a checkpoint's): older field names are read as today's, unknown ones
        dropped."""
        known = {k: v for k, v in upgrade_names(data).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def check(self) -> None:
        """Refuse combinations that cannot train, before any model is loaded."""
        check_schedule(self.lr_schedule)
        if self.method not in ("icae", "autocompressor"):
            raise ValueError(f"method must be 'icae' or 'autocompressor', got {self.method!r}.")
        uses_ac = self.objectives.get("ac", 0) > 0
        if self.method == "icae" and uses_ac:
            raise ValueError("The 'ac' objective (next-token loss over accumulated summaries) trains AutoCompressor "
                             "compressors only: pass --method autocompressor, or drop 'ac' from --objectives.")
        if self.objectives.get("distill", 0) > 0:
            if self.method != "icae":
                raise ValueError("The 'distill' objective trains ICAE-style compressors only (--method icae).")
            if not self.distill_file:
                raise ValueError("The 'distill' objective needs --distill-file: query-shaped examples written by "
                                 "'python -m lloco_index.training.query_data --split train --out FILE'.")
            if self.teacher == "init_reader" and not (self.init_from and (Path(self.init_from) / "reader").is_dir()):
                raise ValueError("--teacher init_reader distils from the reader adapter of --init-from, but "
                                 f"{self.init_from or 'no --init-from'} has no reader/ directory: pass --init-from "
                                 "a compressor with a reader, or --teacher base, or --teacher ADAPTER_DIR.")
        if self.method == "autocompressor":
            if self.slots_curriculum or self.init_from or not self.reader:
                raise ValueError("--method autocompressor trains one LoRA that writes and reads its summaries, with a "
                                 "fixed number of summary tokens: it takes no --slots-curriculum, --init-from or "
                                 "--frozen-decoder.")
            if self.ac_segments < 1 or any(v < 1 for _, v in self.chunks_curriculum):
                raise ValueError("--ac-segments and --chunks-curriculum need at least 1 segment per example.")

    @property
    def uses_windows(self) -> bool:
        """Whether an objective reads token windows of the training text ("qa" and "distill" bring their own data)."""
        return any(w > 0 for k, w in self.objectives.items() if k not in ("qa", "distill"))

    @property
    def max_segments(self) -> int:
        """Segments per training window: 1 for ICAE, the deepest recursion for an AutoCompressor."""
        if self.method != "autocompressor":
            return 1
        return max([self.ac_segments] + [v for _, v in self.chunks_curriculum])


@dataclass
class PretrainResult:
    compressor: ICAECompressor | AutoCompressor
    step: int
    history: list[dict[str, Any]]
    last_eval: Optional[dict[str, float]]


def curriculum_value(schedule: list[list[int]], step: int, default: int) -> int:
    value = default
    for start, v in sorted(schedule):
        if step >= start:
            value = v
    return value


# ------------------------------------------------------------------ building
def build_compressor(config: PretrainConfig, backbone: Backbone) -> ICAECompressor | AutoCompressor:
    """A fresh (or ``init_from``) compressor + reader adapter with the right parameters trainable."""
    from peft import LoraConfig

    from ..families import LORA_TARGETS

    if config.method == "autocompressor":
        return _build_autocompressor(config, backbone)
    icfg = ICAEConfig(n_slots=config.n_slots, segment_length=config.segment_length, pooling=config.pooling,
                      lora_r=config.lora_r, lora_alpha=config.lora_alpha, pool_layer=config.pool_layer)
    compressor = ICAECompressor(backbone, icfg)
    if config.reader:
        backbone.add_adapter(compressor.reader_adapter_name, LoraConfig(
            r=config.reader_r, lora_alpha=config.reader_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
    if config.init_from:
        from safetensors.torch import load_file

        src = Path(config.init_from)
        compressor.load_weights(load_file(str(src / defaults.COMPRESSOR_WEIGHTS_NAME)))
        if config.reader and (src / "reader").is_dir():
            from peft.utils import load_peft_weights

            backbone.set_adapter_state_dict(compressor.reader_adapter_name, load_peft_weights(str(src / "reader")))
    # Only this compressor's adapters and head train; the base decoder (and any other adapter) stays frozen.
    enc, rdr = f".{compressor.encoder_adapter}.", f".{compressor.reader_adapter_name}."
    for name, p in backbone.peft_model.named_parameters():
        p.requires_grad_(enc in name or (config.reader and rdr in name))
    for p in compressor.head.parameters():
        p.requires_grad_(True)
    _maybe_checkpointing(config, backbone)
    return compressor


TEACHER_ADAPTER = "lloco_teacher"


def teacher_adapter(config: PretrainConfig) -> Optional[str]:
    """The adapter the ``distill`` teacher reads with (``None``: the plain decoder)."""
    return None if config.teacher == "base" else TEACHER_ADAPTER


def _add_teacher(config: PretrainConfig, backbone: Backbone) -> None:
    """Load the distillation teacher's adapter, frozen: it is rebuilt from its source on every (re)start."""
    if config.teacher == "base":
        return
    source = Path(config.init_from) / "reader" if config.teacher == "init_reader" else Path(config.teacher)
    if backbone.has_adapter(TEACHER_ADAPTER):
        backbone.delete_adapter(TEACHER_ADAPTER)
    backbone.load_adapter(source, TEACHER_ADAPTER)


def _build_autocompressor(config: PretrainConfig, backbone: Backbone) -> AutoCompressor:
    """An AutoCompressor whose summaries are written and read by the decoder + one trainable LoRA."""
    from peft import LoraConfig

    from ..compressors.autocompressor import READER_ADAPTER
    from ..families import LORA_TARGETS

    compressor = AutoCompressor(backbone, AutoCompressorConfig(n_slots=config.n_slots, segment_length=config.segment_length))
    backbone.add_adapter(READER_ADAPTER, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                    target_modules=list(LORA_TARGETS)))
    compressor.writer_adapter = READER_ADAPTER
    key = f".{READER_ADAPTER}."
    for name, p in backbone.peft_model.named_parameters():
        p.requires_grad_(key in name)
    compressor.embed_summary.weight.requires_grad_(True)
    _maybe_checkpointing(config, backbone)
    return compressor


def _maybe_checkpointing(config: PretrainConfig, backbone: Backbone) -> None:
    if config.gradient_checkpointing:
        backbone.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.base_model.config.use_cache = False


@torch.no_grad()
def fit_projection_lstsq(compressor: ICAECompressor, segments: list[list[int]]) -> float:
    """Initialise the projection by least squares so that, at 1 token per slot, a slot is its token's
    input embedding: the reader then starts from slots that mean something (at higher ratios, the mean
    of the window's embeddings). Returns the fit's relative residual."""
    backbone = compressor.backbone
    saved_slots = compressor.config.n_slots
    compressor.config.n_slots = compressor.config.segment_length  # window of 1 token
    proj = compressor.head.projection
    try:
        xs, ys = [], []
        for seg in segments:
            with torch.no_grad():
                hidden = compressor.pooled([seg])[0]
            x = hidden.float()
            xs.append(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + proj.eps))
            ys.append(backbone.embed_ids(torch.tensor(seg)).float())  # as the decoder sees them (Gemma scales)
        X = torch.cat(xs)
        Y = torch.cat(ys)
        X1 = torch.cat([X, torch.ones(X.shape[0], 1, device=X.device)], 1).double().cpu()
        sol = torch.linalg.lstsq(X1, Y.double().cpu(), driver="gelsd").solution.float()
        proj.norm_weight.fill_(1.0)
        proj.linear.weight.copy_(sol[:-1].T.to(proj.linear.weight.device))
        proj.linear.bias.copy_(sol[-1].to(proj.linear.bias.device))
        residual = float((X1.float() @ sol - Y.cpu()).norm() / Y.norm())
    finally:
        compressor.config.n_slots = saved_slots
    compressor.invalidate_fingerprint()
    return residual


def make_optimizer(config: PretrainConfig, compressor: ICAECompressor | AutoCompressor) -> torch.optim.Optimizer:
    """AdamW over the encoder LoRA (``lr``), the new parameters (``head_lr``: projection and memory tokens, or
    an AutoCompressor's summary tokens) and the reader LoRA (``reader_lr``; an AutoCompressor's one LoRA)."""
    backbone = compressor.backbone
    if isinstance(compressor, AutoCompressor):
        enc_key, rdr_key, head = None, f".{compressor.writer_adapter}.", [compressor.embed_summary.weight]
    else:
        enc_key, rdr_key = f".{compressor.encoder_adapter}.", f".{compressor.reader_adapter_name}."
        head = list(compressor.head.parameters())
    named = [(n, p) for n, p in backbone.peft_model.named_parameters() if p.requires_grad]
    enc = [p for n, p in named if enc_key and enc_key in n]
    rdr = [p for n, p in named if rdr_key in n]
    groups = [{"params": enc, "lr": config.learning_rate, "name": "encoder"}] if enc else []
    groups.append({"params": head, "lr": config.head_lr, "name": "head"})
    if rdr:
        groups.append({"params": rdr, "lr": config.reader_lr or config.learning_rate, "name": "reader"})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.99))


def trainable_state(compressor: ICAECompressor | AutoCompressor) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in compressor.weights().items()}
    reader = compressor.reader_adapter
    if reader is not None and reader != getattr(compressor, "writer_adapter", None):  # an AutoCompressor's is in weights()
        state.update({f"reader.{k}": v.detach().clone() for k, v in compressor.backbone.adapter_state_dict(reader).items()})
    return state


def load_trainable_state(compressor: ICAECompressor | AutoCompressor, state: dict[str, torch.Tensor]) -> None:
    compressor.load_weights({k: v for k, v in state.items() if not k.startswith("reader.")})
    reader = {k[len("reader.") :]: v for k, v in state.items() if k.startswith("reader.")}
    if reader:
        if compressor.reader_adapter is None:
            raise ValueError("The checkpoint holds reader-adapter weights but this compressor has no reader adapter: "
                             "build it with the run's own config (reader=True, i.e. without --frozen-decoder).")
        compressor.backbone.set_adapter_state_dict(compressor.reader_adapter, reader)


# ---------------------------------------------------------------------- loop
class FeatureCache:
    """Pooled encoder features per (segment, ratio), computed once while the encoder is frozen."""

    def __init__(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def pooled(self, compressor: ICAECompressor, segments: list[list[int]]) -> list[torch.Tensor]:
        keys = [(compressor.config.n_slots, tuple(s)) for s in segments]
        missing = list({k: s for k, s in zip(keys, segments) if k not in self._cache}.items())
        if missing:
            with torch.no_grad():
                for (key, _), p in zip(missing, compressor.pooled([s for _, s in missing])):
                    self._cache[key] = p.detach()
        return [self._cache[k] for k in keys]


def _log(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def pretrain(config: PretrainConfig, *, backbone: Optional[Backbone] = None, resume: bool = True,
             progress: bool = True, stop_after: Optional[int] = None,
             windows: Optional[list[Window]] = None, eval_windows: Optional[list[Window]] = None,
             distill_examples: Optional[list[QueryExample]] = None) -> PretrainResult:
    """Train (or resume) a compressor; returns it with the metrics history.

    ``resume=True`` continues from the newest loadable checkpoint in ``run_dir`` (exactly: weights,
    optimizer, scheduler, RNG, data position). ``stop_after`` ends this call after that many steps
    (for time-sliced runs); ``windows``/``eval_windows`` override the data (tests), ``distill_examples`` the
    examples read from ``config.distill_file`` (a caller running several trainings reads them once). A
    ``backbone`` passed in gets this run's adapters: pass a fresh one, or one whose earlier run's compressor
    was ``release()``-d.

    >>> pretrain(PretrainConfig(run_dir="runs/mean-4x", n_slots=64, pool_layer=8, steps=400))
    """
    config.check()
    docs = eval_docs = None
    if not config.uses_windows:
        windows = [Window([], [], 0)] * max(1, config.batch_size * config.grad_accum_steps)  # they only pace the sampler
    if windows is None:  # read the data first: a missing data set must not leave an empty run dir behind
        if config.text:
            docs = load_text_documents(config.text)
            eval_docs = docs[::10] if len(docs) > 1 else docs
            docs = [d for i, d in enumerate(docs) if i % 10] or docs
        else:
            docs = load_documents(config.data_dir, "train", config.sources)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    backbone = backbone or Backbone.load(config.decoder, device=select_device(config.device))
    mix = ObjectiveMix(dict(config.objectives))

    if windows is None:
        token_docs = tokenize_documents(docs, backbone.tokenize)
        windows = make_windows(token_docs, config.segment_length * config.max_segments, config.continuation_length)
    if eval_windows is None and config.eval_every:
        eval_windows = held_out_windows(backbone, config.data_dir, config.eval_windows,
                                        config.eval_segment_length or config.segment_length,
                                        config.eval_continuation_length, documents=eval_docs)
    distill_pool = None
    if mix.weights.get("distill", 0) > 0:
        distill_pool = list(distill_examples) if distill_examples is not None else load_query_examples(config.distill_file)
        if not distill_pool:
            raise ValueError(f"{config.distill_file} holds no examples.")
    qa_pool = None
    if mix.weights.get("qa", 0) > 0:
        qa_pool = load_qa_jsonl(config.qa_file) if config.qa_file else load_squad_qa(
            Path(config.data_dir) / "squad/train.json", config.segment_length, backbone.tokenize)
        unusable = [ex.id for ex in qa_pool if ex.answer is None or not ex.contexts]
        if unusable or not qa_pool:
            raise ValueError(f"The 'qa' objective needs an answer and a context for every example; "
                             f"{config.qa_file or 'the QA data'} has {len(unusable)} without (ids {unusable[:3]}) "
                             f"of {len(qa_pool)}.")

    torch.manual_seed(config.seed)  # LoRA initialisation; a resume overwrites weights and RNG anyway
    compressor = build_compressor(config, backbone)
    if distill_pool is not None:
        _add_teacher(config, backbone)
    sampler = WindowSampler(windows, config.batch_size * config.grad_accum_steps, seed=config.seed)
    optimizer = make_optimizer(config, compressor)
    loop = TrainLoop(optimizer, total_steps=config.steps, warmup_steps=config.warmup_steps,
                     lr_schedule=config.lr_schedule, min_lr_ratio=config.min_lr_ratio,
                     max_grad_norm=config.max_grad_norm, checkpoint_every=config.checkpoint_every, desc="pretrain",
                     progress=progress)
    checkpoints = ckpt.CheckpointDir(run_dir / ckpt.CHECKPOINT_DIR, keep=config.keep_checkpoints)
    history: list[dict[str, Any]] = []
    step = 0
    found = ckpt.load_run_checkpoint(run_dir) if resume else None
    if resume and found is None and ckpt.has_checkpoints(run_dir):
        # Never silently restart from scratch over a run whose checkpoints exist but do not load.
        raise RuntimeError(f"{run_dir}: checkpoints exist but none loads; inspect them or pass resume=False "
                           f"(--no-resume) to start over.")
    if found is not None:
        load_trainable_state(compressor, found.tensors["model"])
        optimizer.load_state_dict(found.objects["optimizer"])
        sampler.load_state_dict(found.state["data"])
        ckpt.set_rng_state(found.objects["rng"])
        history = found.state.get("history", [])
        step = found.step
        # Records written after this checkpoint belong to steps that will be redone: drop them.
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
        tqdm.write(f"resumed from {found.path} at step {step}")
    else:
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        if config.init_projection == "lstsq" and not config.init_from and config.method == "icae":
            fit = [w.segment for w in windows[: max(1, 4096 // config.segment_length)]]
            residual = fit_projection_lstsq(compressor, fit)
            tqdm.write(f"projection initialised by least squares (relative residual {residual:.3f})")
        (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))

    machine = describe_machine(backbone.device)  # for the model card

    def save(at: int) -> None:
        checkpoints.save(at, tensors={"model": trainable_state(compressor)},
                         objects={"optimizer": optimizer.state_dict(), "rng": ckpt.rng_state()},
                         state={"step": at, "config": asdict(config), "data": sampler.state_dict(), "history": history,
                                "machine": machine})

    def run_eval(at: int) -> dict[str, float]:
        metrics = evaluate_compressor(compressor, eval_windows, reader_adapter=compressor.reader_adapter,
                                      qa=None, batch_size=config.batch_size, baseline_cache=baseline_cache)
        record = {"step": at, "eval": metrics, "time": time.time()}
        history.append(record)
        _log(run_dir, record)
        tqdm.write(f"eval @ {at}: " + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
        return metrics

    last_eval = None
    baseline_cache: dict = {}
    if step == 0 and config.eval_every and eval_windows:
        last_eval = run_eval(0)
    end = config.steps if stop_after is None else min(config.steps, step + stop_after)
    tokens_seen, t0 = 0, time.perf_counter()
    is_ac = config.method == "autocompressor"
    reader = SoftPromptReader(backbone, compressor=compressor)  # the query path's prompt preparation
    weights = DistillWeights(config.distill_kl, config.distill_ce, config.distill_hidden, config.kl_temperature)
    features = FeatureCache()

    def encode(segments: list[list[int]], step: int) -> list[torch.Tensor]:
        if step < config.freeze_encoder_steps and not is_ac:
            return [compressor.head.projection(p) for p in features.pooled(compressor, segments)]
        return compressor.encode(segments)

    def train_step(step: int) -> dict[str, Any]:
        """The gradients of optimizer step ``step``: the mean over micro-batches of their token-averaged loss."""
        nonlocal tokens_seen
        seg_len = curriculum_value(config.segment_curriculum, step, config.segment_length)
        compressor.config.n_slots = curriculum_value(config.slots_curriculum, step, config.n_slots)
        n_chunks = curriculum_value(config.chunks_curriculum, step, config.ac_segments) if is_ac else 1
        rng = random.Random(config.seed * 7_919 + step)  # per-step stream: identical after a resume
        batch = sampler.next_batch()
        parts: dict[str, list[float]] = {}
        loss_sum = 0.0
        for micro in range(config.grad_accum_steps):
            raw = batch[micro * config.batch_size : (micro + 1) * config.batch_size]
            chunk = [shorten(w, seg_len, config.continuation_length) for w in raw]
            names = mix.sample(rng, len(chunk))
            examples, recursive, queries = [], [], []
            for name, w, full in zip(names, chunk, raw):
                if name == "distill":
                    queries.append(distill_pool[rng.randrange(len(distill_pool))])
                elif name == "qa":
                    qa = qa_pool[rng.randrange(len(qa_pool))]
                    examples.append(qa_example(reader, qa, seg_len))
                elif name == "ac":
                    recursive.append(split_segments(full.segment, seg_len, n_chunks))
                else:
                    examples.append(window_example(reader, name, w))
            loss, n_scored = None, 0
            if examples:
                soft = encode([e.segment for e in examples], step)
                report = mixed_loss(backbone, compressor.reader_adapter, examples, soft, config.kl_temperature)
                loss, n_scored = report.loss * report.n_target_tokens, report.n_target_tokens
                for k, v in report.per_objective.items():
                    parts.setdefault(k, []).append(v)
                tokens_seen += sum(len(e.segment) + len(e.target_ids) for e in examples)
            if queries:
                segments = [chunk_segments(reader, q, seg_len) for q in queries]
                flat = iter(encode([seg for segs in segments for seg in segs], step))
                drep = distill_loss(reader, queries, [[next(flat) for _ in segs] for segs in segments],
                                    student_adapter=compressor.reader_adapter, teacher_adapter=teacher_adapter(config),
                                    weights=weights)
                loss = drep.loss_sum if loss is None else loss + drep.loss_sum
                n_scored += drep.n_tokens
                for k, v in drep.parts.items():
                    parts.setdefault(f"distill_{k}", []).append(v)
                tokens_seen += sum(len(seg) for segs in segments for seg in segs)
            if recursive:
                with backbone.using(compressor.writer_adapter):
                    ac_loss, n_ac = recursive_lm_loss(compressor, recursive)
                loss = ac_loss * n_ac if loss is None else loss + ac_loss * n_ac
                n_scored += n_ac
                parts.setdefault("ac", []).append(float(ac_loss.detach()))
                tokens_seen += sum(len(seg) for segments in recursive for seg in segments)
            if n_scored == 0:
                continue  # nothing scorable (e.g. one-token segments): no gradient from this micro-batch
            # Token-averaged over every objective in the micro-batch (without 'ac'/'distill' exactly mixed_loss's mean).
            loss = loss / n_scored
            (loss / config.grad_accum_steps).backward()
            loss_sum += float(loss.detach()) / config.grad_accum_steps
        return {"loss": loss_sum, "parts": parts, "seg_len": seg_len, "n_chunks": n_chunks}

    def after_step(done: int, out: dict[str, Any], stats: StepStats) -> AfterStep:
        nonlocal last_eval
        compressor.invalidate_fingerprint()
        record = {"step": done, "loss": out["loss"], "grad_norm": stats.grad_norm, "seg_len": out["seg_len"],
                  **({"ac_segments": out["n_chunks"]} if is_ac else {}),
                  "n_slots": compressor.config.n_slots, "lr": loop.lrs_at(done)[0],  # the next step's
                  **{f"loss_{k}": sum(v) / len(v) for k, v in out["parts"].items()}, "time": time.time()}
        history.append(record)
        _log(run_dir, record)
        elapsed = time.perf_counter() - t0
        if config.eval_every and eval_windows and done % config.eval_every == 0:
            last_eval = run_eval(done)
        return AfterStep(postfix=dict(loss=f"{out['loss']:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}",
                                      seg=out["seg_len"]))

    step = loop.run(step, end, train_step, after_step, save)
    # The ratio the weights were last trained at (a ratio curriculum may have moved it).
    compressor.config.n_slots = curriculum_value(config.slots_curriculum, max(step - 1, 0), config.n_slots)
    return PretrainResult(compressor, step, history, last_eval)


def export_checkpoint(run_dir: str, out_dir: str, *, backbone: Optional[Backbone] = None,
                      step: Optional[int] = None, notes: Optional[dict[str, Any]] = None) -> ICAECompressor | AutoCompressor:
    """Write a run's checkpoint (default: the newest) as a ``from_pretrained`` compressor directory.

    An AutoCompressor run is written in the layout of the public checkpoints: its LoRA merged into a
    copy of the decoder (``decoder/``, with an identity of its own) next to the summary embeddings;
    the compressor returned is the one loaded back from ``out_dir``.
    """
    found = ckpt.load_run_checkpoint(run_dir, step)
    if found is None:
        raise FileNotFoundError(f"No loadable checkpoint in {run_dir}/{ckpt.CHECKPOINT_DIR}")
    config = PretrainConfig.from_dict(found.state["config"])
    config.init_projection = "identity"
    config.init_from = None
    model_state = dict(found.tensors["model"])
    reader_b = [v for k, v in model_state.items() if k.startswith("reader.") and "lora_B" in k]
    if config.method == "icae" and reader_b and all(float(v.abs().max()) == 0 for v in reader_b):
        # LoRA B still zero: the reader never trained and is the identity. Ship none rather than a no-op.
        config.reader = False
        model_state = {k: v for k, v in model_state.items() if not k.startswith("reader.")}
    backbone = backbone or Backbone.load(config.decoder, device=select_device(config.device))
    compressor = build_compressor(config, backbone)
    load_trainable_state(compressor, model_state)
    compressor.config.n_slots = curriculum_value(config.slots_curriculum, max(found.step - 1, 0), config.n_slots)
    compressor.config.extra = {"training": {"run": Path(run_dir).name, "step": found.step,
                                            "objectives": config.objectives}, **(notes or {})}
    compressor.invalidate_fingerprint()
    if isinstance(compressor, AutoCompressor):
        return _export_autocompressor(compressor, Path(out_dir))
    compressor.save_pretrained(out_dir)
    return compressor


def _export_autocompressor(compressor: AutoCompressor, out_dir: Path) -> AutoCompressor:
    compressor.save_merged(out_dir)
    return AutoCompressor.from_directory(out_dir, device=compressor.backbone.device)
