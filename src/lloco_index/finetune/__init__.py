"""Finetune LoRA adapters that teach the decoder to read compressed contexts (framework-free core).

>>> from lloco_index.finetune import FinetuneConfig, LoRAFinetuner, build_train_examples
>>> result = LoRAFinetuner(reader, train, val, adapter_name="legal", output_dir="adapters/legal").train()

The LlamaIndex entry point is :class:`lloco_index.llamaindex.LLoCOFinetuneEngine`; the command line is
``lloco-index finetune PERSIST_DIR DATA``.
"""

from ..training.checkpoint import CheckpointDir
from ..training.data import QAExample, load_qa_examples
from .config import FinetuneConfig
from .data import TrainExample, examples_hash, load_instruction_examples, mix_instructions, split_train_val
from .examples import Context, build_train_examples, self_teacher
from .trainer import FinetuneResult, FinetuneResumeError, LoRAFinetuner, target_token_ids

__all__ = [
    "CheckpointDir",
    "Context",
    "FinetuneConfig",
    "FinetuneResult",
    "FinetuneResumeError",
    "LoRAFinetuner",
    "QAExample",
    "TrainExample",
    "build_train_examples",
    "examples_hash",
    "load_instruction_examples",
    "load_qa_examples",
    "mix_instructions",
    "self_teacher",
    "split_train_val",
    "target_token_ids",
]
