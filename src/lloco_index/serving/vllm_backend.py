"""vLLM as the generation backend: prompt embeddings (soft prompts spliced in) + one LoRA request per query.

UNTESTED IN THIS REPOSITORY'S CI: vLLM needs CUDA; the parity test
(tests/unit/serving/test_scale_vllm.py) runs only where a GPU and vLLM are present and is
skipped, visibly, elsewhere. Written against vLLM's documented API:

- ``LLM(model=..., enable_prompt_embeds=True, enable_lora=True, max_lora_rank=...)``;
- ``LLM.generate([{"prompt_embeds": tensor[positions, hidden]}, ...], SamplingParams(...), lora_request=[...])``
  (``vllm.inputs.EmbedsPrompt``; one ``LoRARequest`` or ``None`` per prompt);
- the OpenAI-compatible server started with ``--enable-prompt-embeds --enable-lora --lora-modules name=path``
  takes ``prompt_embeds`` (base64 of ``torch.save(tensor)``) on ``/v1/completions`` with ``model=<lora name>``.

Prompt embeddings and LoRA together: vLLM's V1 engine (the only engine from
0.11.0 on) runs them together; its own test suite serves prompt embeddings
through a LoRA model name. The ``serve`` extra pins ``vllm>=0.11.0`` for that.
Where a request cannot be served with both (an engine started without
``enable_lora``, an adapter vLLM cannot load, an older vLLM), that request
falls back to the Hugging Face reader, with a warning naming the reason.

The prompt is built exactly as the HF path builds it (``SoftPromptReader.prepare``:
chat template, placeholders -> soft prompts, text pieces embedded with the
decoder's own table), so both backends read the same vectors.

>>> from lloco_index.serving.vllm_backend import VLLMReader, attach_vllm
>>> vreader = VLLMReader.from_reader(llm.reader, adapters={"legal": "adapters/legal"})   # starts vllm.LLM
>>> vreader.generate_batch([msgs_a, msgs_b], adapter="legal")
>>> attach_vllm(llm, vreader)      # LLoCOLLM / ChatLLoCO now generate on vLLM
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import urllib.request
import warnings
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from ..generation import AUTO, GenerationResult, Message, PreparedPrompt, SoftPromptReader

logger = logging.getLogger(__name__)

MIN_VLLM = (0, 11, 0)  # V1 engine only; prompt embeds + LoRA served together


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        match = re.match(r"\d+", piece)  # "2rc1" -> 2: a pre-release counts as its release
        parts.append(int(match.group()) if match else 0)
    return tuple(parts)


def vllm_supports_embeds_with_lora(version: Optional[str] = None) -> bool:
    """Whether this vLLM release serves prompt embeddings together with LoRA requests (>= 0.11.0)."""
    if version is None:
        try:
            import vllm
        except ImportError:
            return False
        version = vllm.__version__
    return _version_tuple(version) >= MIN_VLLM


class VLLMReader(SoftPromptReader):
    """A :class:`SoftPromptReader` whose ``generate``/``generate_batch`` run on a vLLM engine.

    Everything before generation (templates, placeholders, position counts,
    budget errors) is the HF reader's own code; ``score_options`` stays on HF.
    """

    queue_batching = False  # vLLM batches concurrent requests itself; the HF batching queue would bypass it

    def __init__(self, backbone, store=None, *, engine: Any, adapters: Optional[dict[str, str]] = None,
                 lora_enabled: Optional[bool] = None, **kwargs: Any):
        super().__init__(backbone, store, **kwargs)
        self.engine = engine
        self.adapters = dict(adapters or {})  # reader adapter name -> peft directory (vLLM loads it itself)
        self._lora_ids = {name: i + 1 for i, name in enumerate(sorted(self.adapters))}
        if lora_enabled is None:
            lora_enabled = bool(getattr(getattr(engine, "llm_engine", None), "vllm_config", None)
                                and engine.llm_engine.vllm_config.lora_config is not None)
        self.lora_enabled = lora_enabled and vllm_supports_embeds_with_lora()
        self.fallbacks = 0  # requests answered by the HF reader instead

    @classmethod
    def from_reader(cls, reader: SoftPromptReader, *, model: Optional[str] = None,
                    adapters: Optional[dict[str, str]] = None, engine: Any = None, **engine_kwargs: Any) -> "VLLMReader":
        """Start ``vllm.LLM`` on the reader's decoder directory (bf16, prompt embeds on, LoRA on if adapters)."""
        lora_enabled = None  # a given engine: read from its config
        if engine is None:
            engine = start_engine(model or _decoder_dir(reader), adapters=adapters, **engine_kwargs)
            lora_enabled = bool(adapters)
        return cls(reader.backbone, reader.store, engine=engine, adapters=adapters, lora_enabled=lora_enabled,
                   compressor=reader.compressor,
                   adapter=reader.default_adapter, max_new_tokens=reader.max_new_tokens,
                   system_prompt=reader.system_prompt)

    # ------------------------------------------------------------ requests
    def _lora_request(self, adapter: Optional[str]):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter, self._lora_ids[adapter], self.adapters[adapter])

    def _fallback_reason(self, adapter: Optional[str]) -> Optional[str]:
        if adapter is None:
            return None
        if adapter not in self.adapters:
            return f"adapter '{adapter}' has no directory registered with the vLLM backend (adapters={{name: path}})"
        if not self.lora_enabled:
            return ("this vLLM engine cannot combine prompt embeddings with LoRA (started without enable_lora, "
                    f"or vLLM older than {'.'.join(map(str, MIN_VLLM))})")
        return None

    def _sampling(self, max_new_tokens: int):
        from vllm import SamplingParams

        tok = self.backbone.tokenizer
        return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=True,
                              stop_token_ids=[tok.eos_token_id] if tok.eos_token_id is not None else None)

    def _embeds(self, prepared: PreparedPrompt) -> torch.Tensor:
        # [positions, hidden] on CPU in the engine's dtype; vLLM copies it to the GPU itself.
        return prepared.inputs_embeds[0].detach().to("cpu", torch.bfloat16)

    # ---------------------------------------------------------- generation
    def generate_batch(self, list_of_messages: Sequence[Sequence[Message]], *, adapter: Optional[str] = AUTO,
                       max_new_tokens: Optional[int] = None, batch_size: int = 0,
                       progress: Union[bool, str] = False) -> list[GenerationResult]:
        """All prompts in ONE ``LLM.generate`` call (vLLM batches continuously); ``batch_size`` is ignored and
        ``progress`` turns on vLLM's own bar."""
        limit = max_new_tokens or self.max_new_tokens
        resolved = self.resolve_adapter(adapter)
        prepared = [self.prepare(m, max_new_tokens=limit) for m in list_of_messages]
        reason = self._fallback_reason(resolved)
        if reason is not None:
            warnings.warn(f"vLLM backend: answering {len(prepared)} request(s) with the HF reader: {reason}.", stacklevel=2)
            self.fallbacks += len(prepared)
            return SoftPromptReader.generate_batch(self, list_of_messages, adapter=resolved, max_new_tokens=limit,
                                                   progress=progress)
        lora = self._lora_request(resolved)
        outputs = self.engine.generate([{"prompt_embeds": self._embeds(p)} for p in prepared], self._sampling(limit),
                                       lora_request=[lora] * len(prepared) if lora is not None else None,
                                       use_tqdm=bool(progress))
        return [GenerationResult(text=o.outputs[0].text.strip(), prompt=p, new_tokens=len(o.outputs[0].token_ids))
                for o, p in zip(outputs, prepared)]

    batch = generate_batch

    def generate(self, messages: Sequence[Message], *, adapter: Optional[str] = AUTO,
                 max_new_tokens: Optional[int] = None) -> GenerationResult:
        return self.generate_batch([messages], adapter=adapter, max_new_tokens=max_new_tokens)[0]

    def stream(self, messages: Sequence[Message], *, adapter: Optional[str] = AUTO,
               max_new_tokens: Optional[int] = None) -> Iterator[str]:
        """The offline ``vllm.LLM`` does not stream: the whole answer comes as one delta."""
        text = self.generate(messages, adapter=adapter, max_new_tokens=max_new_tokens).text
        if text:
            yield text


def start_engine(model: str, *, adapters: Optional[dict[str, str]] = None, max_lora_rank: int = 64,
                 dtype: str = "bfloat16", **kwargs: Any):
    """``vllm.LLM`` with prompt embeddings on (and LoRA on when adapters are given)."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError("The vLLM backend needs vLLM and a CUDA GPU: pip install 'lloco-index[serve]'") from exc
    if not vllm_supports_embeds_with_lora(vllm.__version__) and adapters:
        warnings.warn(f"vLLM {vllm.__version__} predates {'.'.join(map(str, MIN_VLLM))}: requests with an adapter "
                      f"will fall back to the HF reader.", stacklevel=2)
    lora = bool(adapters) and vllm_supports_embeds_with_lora(vllm.__version__)
    options = dict(model=model, dtype=dtype, enable_prompt_embeds=True)
    if lora:
        options.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max(1, len(adapters)))
    options.update(kwargs)
    return vllm.LLM(**options)


def _decoder_dir(reader: SoftPromptReader) -> str:
    from ..models import default_decoder_dir

    return reader.backbone.source_path or str(default_decoder_dir())


def attach_vllm(model: Any, vllm_reader: VLLMReader) -> None:
    """Make a :class:`LLoCOLLM` or :class:`ChatLLoCO` generate through ``vllm_reader``.

    Both adapters call only the reader's ``prepare``/``generate``/``stream``
    and position counting, which :class:`VLLMReader` keeps.
    """
    if not hasattr(model, "_reader"):
        raise TypeError(f"attach_vllm expects LLoCOLLM or ChatLLoCO, got {type(model).__name__}")
    model._reader = vllm_reader
    if getattr(model, "_batcher", None) is not None:
        model._batcher = None  # a batching queue built on the HF reader would bypass vLLM


class VLLMServerClient:
    """Send prompt embeddings + a LoRA model name to a running ``vllm serve`` (OpenAI-compatible).

    Start the server with ``vllm serve MODEL --enable-prompt-embeds --enable-lora
    --lora-modules legal=/adapters/legal``; a request for adapter ``legal``
    uses ``model="legal"``, one without an adapter the base model's name.

    >>> client = VLLMServerClient("http://gpu-host:8000", base_model="SmolLM2-135M-Instruct")
    >>> client.complete(reader.prepare(messages), adapter="legal", max_new_tokens=64)
    """

    def __init__(self, base_url: str, *, base_model: str, api_key: Optional[str] = None, timeout: float = 120.0):
        self.base_url = base_url.rstrip("/")
        self.base_model = base_model
        self.api_key = api_key
        self.timeout = timeout

    @staticmethod
    def encode(embeds: torch.Tensor) -> str:
        buffer = io.BytesIO()
        torch.save(embeds.detach().to("cpu").contiguous(), buffer)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def complete(self, prepared: PreparedPrompt, *, adapter: Optional[str] = None, max_new_tokens: int = 64) -> str:
        body = {"model": adapter or self.base_model, "prompt": "", "max_tokens": max_new_tokens, "temperature": 0.0,
                "prompt_embeds": self.encode(prepared.inputs_embeds[0].to(torch.bfloat16))}
        request = urllib.request.Request(f"{self.base_url}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = json.loads(response.read())
        return payload["choices"][0]["text"].strip()
