"""The compressor protocol and the save/load plumbing shared by all compressors.

A compressor turns chunks of text into soft prompts: tensors of shape
``[positions, hidden_size]`` in the decoder's input-embedding space. Its
``fingerprint`` names the exact weights and base model, so a store written
by one compressor is never read with another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from tqdm.auto import tqdm

from .. import defaults
from ..backbone import Backbone
from ..errors import EmptyDocumentError, InputError, ModelNotFoundError, StoreMismatchError
from ..fileio import atomic_write_bytes, read_json


@runtime_checkable
class Compressor(Protocol):
    """What the store, node parser and LLM need from a compressor."""

    n_slots: int
    segment_length: int
    prompt_format: str  # "chat" or "plain": how the reader lays out prompts around the soft prompts
    reader_adapter: Optional[str]  # the backbone adapter that reads these soft prompts, if any
    source_dir: Optional[Path]  # the directory it was loaded from (None: built in code)

    @property
    def fingerprint(self) -> str: ...

    @property
    def backbone(self) -> Backbone: ...

    def compress(self, texts: Sequence[str], *, batch_size: Optional[int] = None, progress: bool = False) -> list[torch.Tensor]: ...

    def num_positions(self, n_tokens: int) -> int: ...


@dataclass
class CompressorConfig:
    """Fields every compressor directory records in ``lloco_compressor.json``."""

    mode: str = ""
    base_model: str = defaults.DEFAULT_DECODER_NAME  # identity of the decoder it was trained with
    n_slots: int = defaults.DEFAULT_N_SLOTS
    segment_length: int = defaults.DEFAULT_SEGMENT_LENGTH
    storage_dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)  # training provenance, metrics

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def read_compressor_config(directory: Union[str, Path]) -> dict:
    """The parsed ``lloco_compressor.json`` of a compressor directory."""
    directory = Path(directory)
    path = directory / defaults.COMPRESSOR_CONFIG_NAME
    if not path.is_file():
        raise ModelNotFoundError(
            f"No compressor at '{directory}' ({defaults.COMPRESSOR_CONFIG_NAME} missing). Pass a directory written "
            f"by save_pretrained / `lloco-index pretrain`, or omit it to use the shipped default."
        )
    return read_json(path, lambda exc: ModelNotFoundError(
        f"{path} is not valid JSON ({exc}); restore or re-save the compressor."))


def decoder_for(config: dict) -> Optional[str]:
    """The decoder a compressor config was trained with, as ``Backbone.load`` takes it (``None``: the default)."""
    base = config.get("base_model")
    if base in (None, defaults.DEFAULT_DECODER_NAME):
        return None
    if isinstance(base, str) and base.startswith("local:"):
        raise ModelNotFoundError(
            f"This compressor was trained for the local decoder '{base}': pass decoder=<its directory>."
        )
    return base


STORAGE_DTYPES = ("bfloat16", "float16", "float32")


def check_compressor_config(fields: Any, source: str) -> None:
    """Refuse sizes and dtypes no compressor can work with, naming the field (``source``: where it came from).

    ``fields`` is a config object or the dict read from ``lloco_compressor.json``; absent keys take defaults.
    """
    get = fields.get if isinstance(fields, dict) else lambda name, default=None: getattr(fields, name, default)
    for name in ("segment_length", "n_slots"):
        value = get(name, 1)
        # bool is an int to Python, but `n_slots: true` is a typo, not one slot.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            shown = f"{value!r} ({type(value).__name__})" if not isinstance(value, int) or isinstance(value, bool) else f"{value}"
            raise InputError(f"{source}: {name} must be a whole number of at least 1, got {shown}. Fix the value, or "
                             f"save the compressor again with save_pretrained.")
    dtype = get("storage_dtype", STORAGE_DTYPES[0])
    if dtype not in STORAGE_DTYPES:
        raise InputError(f"{source}: storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}. Fix the "
                         f"value, or save the compressor again with save_pretrained.")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class BaseCompressor:
    """Shared behaviour: tokenising into segments, batching, fingerprints, save/load.

    Subclasses implement :meth:`_compress_segments` (a batch of token-id lists,
    each at most ``segment_length`` long, to one tensor per segment) and say
    which tensors make up their weights in :meth:`weights`.
    """

    mode: ClassVar[str] = ""
    config_class: ClassVar[type] = CompressorConfig
    # How the reader lays out prompts around these soft prompts: "chat" applies the decoder's chat
    # template; "plain" is raw text without BOS, as LLoCO reads AutoCompressor summaries.
    prompt_format: ClassVar[str] = "chat"
    # The LoRA adapter on the backbone that reads this compressor's soft prompts, when it ships one
    # (SoftPromptReader(adapter="auto") selects it); subclasses that carry one override this.
    reader_adapter: Optional[str] = None
    # The directory the compressor was loaded from (None when built in code); indexes record it.
    source_dir: Optional[Path] = None

    def __init__(self, backbone: Backbone, config: CompressorConfig):
        check_compressor_config(config, f"{type(self).__name__} config")
        self._backbone = backbone
        self.config = config
        self.config.mode = self.mode
        # The fingerprint hashes the config: record the decoder now, not first at save time, so a
        # compressor made in code and the same one reloaded from disk have the same fingerprint.
        self.config.base_model = backbone.identity
        self._fingerprint: Optional[str] = None

    # ------------------------------------------------------------- protocol
    @property
    def backbone(self) -> Backbone:
        return self._backbone

    @property
    def n_slots(self) -> int:
        return self.config.n_slots

    @property
    def segment_length(self) -> int:
        return self.config.segment_length

    @property
    def storage_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.storage_dtype)

    @property
    def fingerprint(self) -> str:
        """sha256 of mode, base model, config and weights (first 16 hex digits)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            cfg = asdict(self.config)
            cfg.pop("extra", None)  # provenance notes do not change the vectors
            h.update(json.dumps(cfg, sort_keys=True).encode())
            h.update(self.backbone.identity.encode())
            h.update(tensors_digest(self.weights()).encode())
            self._fingerprint = f"{self.mode}-{h.hexdigest()[:16]}"
        return self._fingerprint

    def invalidate_fingerprint(self) -> None:
        """Call after changing weights (training does)."""
        self._fingerprint = None

    def num_positions(self, n_tokens: int) -> int:
        """Decoder positions taken by the soft prompt of a chunk of ``n_tokens`` tokens."""
        full, rest = divmod(n_tokens, self.segment_length)
        return full * self._segment_positions(self.segment_length) + (self._segment_positions(rest) if rest else 0)

    def _segment_positions(self, n_tokens: int) -> int:
        return self.n_slots

    # ---------------------------------------------------------- compression
    def tokenize_segments(self, text: str) -> list[list[int]]:
        """Token ids of ``text`` cut into segments of at most ``segment_length``."""
        from ..chunking import check_text

        if not check_text(text).strip():
            raise EmptyDocumentError(
                "Cannot compress an empty or whitespace-only text: drop empty documents before compressing "
                "(LLoCONodeParser skips them)."
            )
        ids = self.backbone.tokenize(text)
        if not ids:
            raise EmptyDocumentError(f"Text {text[:40]!r} has no tokens under the decoder's tokenizer; drop it.")
        return [ids[i : i + self.segment_length] for i in range(0, len(ids), self.segment_length)]

    def compress(self, texts: Sequence[str], *, batch_size: Optional[int] = None, progress: bool = False) -> list[torch.Tensor]:
        """Compress each text to one soft prompt ``[positions, hidden]`` (segments concatenated).

        >>> [prompt] = compressor.compress(["A long chunk of text ..."])
        >>> prompt.shape   # (n_slots, hidden_size) for a text of one segment
        """
        batch_size = batch_size or defaults.DEFAULT_COMPRESS_BATCH_SIZE
        per_text = [self.tokenize_segments(t) for t in texts]
        return self._compress_texts(per_text, batch_size=batch_size, progress=progress)

    def _compress_texts(self, per_text: list[list[list[int]]], *, batch_size: int, progress: bool) -> list[torch.Tensor]:
        """Default: segments are independent, so batch them across texts."""
        flat = [(i, seg) for i, segs in enumerate(per_text) for seg in segs]
        # Similar lengths together waste less padding.
        order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
        outputs: list[Optional[torch.Tensor]] = [None] * len(flat)
        bar = tqdm(total=len(flat), desc="compressing", unit="seg", disable=not progress)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                results = self._compress_segments([flat[j][1] for j in idx])
                for j, r in zip(idx, results):
                    outputs[j] = r.to(self.storage_dtype).cpu()
                bar.update(len(idx))
        bar.close()
        grouped: list[list[torch.Tensor]] = [[] for _ in per_text]
        for (i, _), out in zip(flat, outputs):
            grouped[i].append(out)
        return [torch.cat(g, dim=0) for g in grouped]

    def _compress_segments(self, segments: list[list[int]]) -> list[torch.Tensor]:
        raise NotImplementedError

    # -------------------------------------------------------- persistence
    def weights(self) -> dict[str, torch.Tensor]:
        """Tensors that, with the config and base model, define this compressor."""
        return {}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{type(self).__name__} has no weights, got {sorted(tensors)[:3]}")

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write ``lloco_compressor.json`` + ``compressor.safetensors`` atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.base_model = self.backbone.identity
        atomic_save_safetensors(self.weights(), directory / defaults.COMPRESSOR_WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_bytes(directory / defaults.COMPRESSOR_CONFIG_NAME, self.config.to_json().encode())

    @classmethod
    def from_directory(cls, directory: Union[str, Path], config_dict: Optional[dict] = None, *,
                       backbone: Optional[Backbone] = None,
                       decoder: Optional[Union[str, Path]] = None) -> "BaseCompressor":
        """Load a directory written by :meth:`save_pretrained` (``load_compressor`` calls this).

        ``backbone`` is a decoder already loaded, ``decoder`` where to load one from; default: the
        decoder the config records. Either way it must be the decoder the compressor was trained for.
        """
        directory = Path(directory)
        if config_dict is None:
            config_dict = read_compressor_config(directory)
        if backbone is None:
            backbone = Backbone.load(decoder if decoder is not None else decoder_for(config_dict))
        if config_dict.get("base_model") and config_dict["base_model"] != backbone.identity:
            raise StoreMismatchError(
                f"Compressor at '{directory}' was trained for base model '{config_dict['base_model']}', but the loaded "
                f"decoder is '{backbone.identity}'. Load the decoder it was trained with, or train a compressor for this one."
            )
        compressor = cls._from_directory(directory, backbone, config_dict)
        compressor.source_dir = directory.resolve()
        return compressor

    @classmethod
    def _from_directory(cls, directory: Path, backbone: Backbone, config_dict: dict) -> "BaseCompressor":
        from safetensors.torch import load_file

        check_compressor_config(config_dict, str(directory / defaults.COMPRESSOR_CONFIG_NAME))
        cls._check_directory(directory, config_dict)
        fields = {k: v for k, v in config_dict.items() if k in cls.config_class.__dataclass_fields__}
        config = cls.config_class(**fields)
        compressor = cls(backbone, config)
        try:
            weights_path = directory / defaults.COMPRESSOR_WEIGHTS_NAME
            expected = compressor.weights()
            if not weights_path.is_file():
                if expected:
                    raise ModelNotFoundError(
                        f"{weights_path} is missing: without it the compressor would load untrained (random "
                        f"weights) and its soft prompts would mean nothing. Restore the file from where the "
                        f"compressor was saved, or train it again (`lloco-index pretrain`)."
                    )
                return compressor
            try:
                tensors = load_file(str(weights_path))
            except Exception as exc:
                raise ModelNotFoundError(
                    f"{weights_path} is corrupt or truncated ({exc}); restore it from the package or retrain."
                ) from exc
            missing = sorted(set(expected) - set(tensors))
            if missing:
                raise ModelNotFoundError(
                    f"{weights_path} lacks {len(missing)} of the tensors of this {cls.mode} compressor (e.g. "
                    f"{missing[0]!r}); it is incomplete or belongs to another compressor. Restore the file from "
                    f"where the compressor was saved, or train it again."
                )
            try:
                compressor.load_weights(tensors)
            except (RuntimeError, ValueError) as exc:
                raise ModelNotFoundError(
                    f"The weights in {weights_path} do not fit the compressor that {defaults.COMPRESSOR_CONFIG_NAME} "
                    f"describes on decoder '{backbone.identity}' ({str(exc).splitlines()[0]}); the two files are from "
                    f"different compressors. Restore both from the same save_pretrained."
                ) from exc
            compressor._load_directory_extras(directory)
        except BaseException:
            compressor._release()  # a refused directory leaves nothing of itself on a shared decoder
            raise
        return compressor

    @classmethod
    def _check_directory(cls, directory: Path, config_dict: dict) -> None:
        """Refuse a directory that lacks a file its config says is there, before anything is built."""

    def _load_directory_extras(self, directory: Path) -> None:
        """Load what a compressor keeps beside its weights (the ICAE reader adapter)."""

    def release(self) -> None:
        """Remove this compressor's adapters from its (shared) backbone; the compressor is unusable after."""
        self._release()

    def _release(self) -> None:
        """Take this compressor's adapters off the backbone (after a refused load)."""
