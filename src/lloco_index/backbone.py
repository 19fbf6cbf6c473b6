"""One decoder in memory, shared by the compressor and the reader.

The ICAE-style compressor is the decoder plus its own LoRA adapter; the reader
is the same decoder with that adapter switched off and, optionally, a reader
or domain adapter switched on. :class:`Backbone` owns the model, the
tokenizer, the peft adapters and a lock, so that compression and generation
never see each other's adapter state.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .errors import ModelNotFoundError
from .families import check_decoder
from .models import load_decoder


class Backbone:
    """A causal LM with named LoRA adapters that can be switched per call.

    >>> backbone = Backbone.load()                       # embedded SmolLM2
    >>> backbone.load_adapter("/adapters/legal", "legal")
    >>> with backbone.using("legal") as model:
    ...     out = model(inputs_embeds=embeds)
    """

    def __init__(self, model: torch.nn.Module, tokenizer, identity: str, source_path: Optional[str] = None):
        check_decoder(model)  # refuse an unsupported family here, not with a traceback mid-training
        self.base_model = model
        self.source_path = source_path  # where to reload the decoder from (None: the embedded default)
        self.tokenizer = tokenizer
        self.identity = identity
        self.peft_model = None  # created on the first adapter
        self.lock = threading.RLock()
        self._holders: dict[str, weakref.ref] = {}  # adapter name -> the live object that owns it

    @classmethod
    def load(cls, name_or_path: Optional[Union[str, Path]] = None, *, dtype: Optional[torch.dtype] = None,
             device: Optional[Union[str, torch.device]] = None) -> "Backbone":
        """The decoder on ``device`` (default: a GPU when there is one, else the CPU) in ``dtype``
        (default: bf16 on a GPU, float32 on the CPU); see :func:`lloco_index.models.select_dtype`."""
        bundle = load_decoder(name_or_path, dtype=dtype, device=device)
        # One Backbone per loaded decoder so adapters injected into the model are shared, not duplicated.
        existing = getattr(bundle, "_backbone", None)
        if existing is None:
            existing = cls(bundle.model, bundle.tokenizer, bundle.identity, bundle.source_path)
            bundle._backbone = existing
        return existing

    # ------------------------------------------------------------------ facts
    @property
    def config(self):
        return self.base_model.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def context_window(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 4096))

    def embedding_table(self) -> torch.nn.Embedding:
        return self.base_model.get_input_embeddings()

    @property
    def embedding_scale(self) -> float:
        """The factor the embedding module multiplies its rows by (Gemma: sqrt(hidden); others: 1)."""
        return float(getattr(self.embedding_table(), "scalar_embed_scale", 1.0))

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding_table()(ids.to(self.device))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text piece, without BOS or other special tokens re-added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # --------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.peft_model.peft_config) if self.peft_model is not None else []

    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_names

    def add_adapter(self, name: str, lora_config) -> None:
        """Add a fresh LoRA adapter (e.g. for training)."""
        from peft import get_peft_model

        with self.lock, warnings.catch_warnings():
            # peft calls a transformers API that transformers 5 deprecates; not actionable for users.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if self.peft_model is None:
                self.peft_model = get_peft_model(self.base_model, lora_config, adapter_name=name)
            elif not self.has_adapter(name):
                self.peft_model.add_adapter(name, lora_config)

    def load_adapter(self, path: Union[str, Path], name: str, *, is_trainable: bool = False) -> None:
        """Load a saved peft adapter directory under ``name`` (several can be loaded at once)."""
        from peft import PeftModel

        with self.lock, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if self.has_adapter(name):
                return
            try:
                if self.peft_model is None:
                    state = _BareModelState(self.base_model)
                    try:
                        self.peft_model = PeftModel.from_pretrained(self.base_model, str(path), adapter_name=name,
                                                                    is_trainable=is_trainable)
                    except BaseException:
                        # The first adapter wraps the model in place: peft swaps LoRA layers into it before
                        # it reads the weights, so a failed read would leave random LoRA weights running in
                        # every later call of the bare model.
                        state.restore()
                        raise
                    return
                self.peft_model.load_adapter(str(path), adapter_name=name, is_trainable=is_trainable)
            except BaseException as exc:
                # peft registers the adapter's config and layers before it reads the weights: a failed read
                # would leave a selectable adapter of random LoRA weights under this name.
                if self.has_adapter(name):
                    self.peft_model.delete_adapter(name)
                if not isinstance(exc, Exception):
                    raise
                raise ModelNotFoundError(
                    f"Adapter '{path}' could not be loaded as '{name}' ({type(exc).__name__}: {exc}); nothing was "
                    f"loaded under that name. Restore the adapter directory (adapter_config.json and the weights "
                    f"file) or finetune it again."
                ) from exc

    def delete_adapter(self, name: str) -> None:
        """Remove the adapter ``name`` and free its weights (``KeyError`` when it is not loaded)."""
        with self.lock:
            if not self.has_adapter(name):
                raise KeyError(f"Adapter '{name}' is not loaded; loaded adapters: {self.adapter_names}.")
            with warnings.catch_warnings():
                # "Adapter X was active which is now deleted": using() activates adapters per call anyway.
                warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
                self.peft_model.delete_adapter(name)

    def adapter_holder(self, name: str) -> Optional[object]:
        """The live object that reserved adapter ``name`` with :meth:`reserve_adapter_name`, if any."""
        with self.lock:
            ref = self._holders.get(name)
            return ref() if ref is not None else None

    def reserve_adapter_name(self, holder: object, preferred: str, numbered: str) -> str:
        """An adapter name for ``holder`` alone: ``preferred`` when free, else ``numbered.format(n)``, n = 2, 3, ...

        A name is taken while another live object holds it, or while an adapter
        nobody holds is loaded under it. A name whose holder no longer exists is
        free again: the adapter it left behind is deleted, so ``holder`` starts
        from fresh weights. The name is released when ``holder`` is garbage-collected.
        """
        with self.lock:
            n = 1
            while True:
                name = preferred if n == 1 else numbered.format(n)
                ref = self._holders.get(name)
                if ref is not None and ref() is None:  # its holder is gone: reclaim the name
                    del self._holders[name]
                    if self.has_adapter(name):
                        self.delete_adapter(name)
                    ref = None
                if ref is None and not self.has_adapter(name):
                    self._holders[name] = weakref.ref(holder)
                    return name
                n += 1

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: this package never resizes the vocabulary, so the base embedding matrices
        # are never part of an adapter. peft's "auto" would look for the base model's config.json at the path the
        # adapter was saved from (another machine's cache for a shipped adapter) and warn "Could not find a
        # config file in …" about a path that does not exist here.
        return get_peft_model_state_dict(self.peft_model, adapter_name=name, save_embedding_layers=False)

    def set_adapter_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft_model, state, adapter_name=name)

    @contextlib.contextmanager
    def using(self, adapter: Optional[str]) -> Iterator[torch.nn.Module]:
        """Yield the causal LM with only ``adapter`` active (``None``: plain base weights).

        Trainability (``requires_grad``) of every parameter is left as it was:
        peft's ``set_adapter`` would otherwise freeze the adapters of a joint
        encoder + reader training step.
        """
        with self.lock:
            if self.peft_model is None:
                if adapter is not None:
                    raise KeyError(f"Adapter '{adapter}' is not loaded (no adapters are). Load it with load_adapter().")
                yield self.base_model
                return
            grads = {n: p.requires_grad for n, p in self.peft_model.named_parameters()}
            if adapter is None:
                # peft's disable_adapter() re-enables on exit through set_adapter(), which freezes every
                # adapter but the last active one: restore trainability afterwards too.
                try:
                    with self.peft_model.disable_adapter():
                        yield self.base_model
                finally:
                    for n, p in self.peft_model.named_parameters():
                        p.requires_grad_(grads[n])
                return
            if not self.has_adapter(adapter):
                raise KeyError(f"Adapter '{adapter}' is not loaded; loaded adapters: {self.adapter_names}.")
            self.peft_model.base_model.set_adapter(adapter)
            for n, p in self.peft_model.named_parameters():
                p.requires_grad_(grads[n])
            yield self.base_model


class _BareModelState:
    """What wrapping a bare model in a PeftModel changes, so that a failed wrap can be undone."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.had_peft_config = hasattr(model, "peft_config")

    def restore(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        # Outermost first: a replaced wrapper's own children (its base layer) are never visited again.
        for name, module in list(self.model.named_modules()):
            if name and isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                try:
                    parent = self.model.get_submodule(parent_name) if parent_name else self.model
                except AttributeError:
                    continue  # inside a wrapper already replaced
                if getattr(parent, child, None) is module:
                    setattr(parent, child, module.get_base_layer())
        if not self.had_peft_config and hasattr(self.model, "peft_config"):
            del self.model.peft_config
        for n, p in self.model.named_parameters():
            if n in self.requires_grad:
                p.requires_grad_(self.requires_grad[n])
