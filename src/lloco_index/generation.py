"""The soft-prompt reader: prompt text with placeholders -> input embeddings -> tokens.

Compressed chunks carry the placeholder ``<|lloco:ID|>`` as their LLM-facing
content, so they flow unchanged through LlamaIndex and LangChain prompt
templates. The reader applies the model's chat template to the messages,
splits the result on placeholders, embeds the text pieces with the decoder's
own embedding table (no BOS re-added), splices each soft prompt in where its
placeholder stood, and generates from ``inputs_embeds`` with the selected
LoRA adapter.

Trust model (docs/concepts.md, "Trust: prompt text and user text"): a
question containing ``<|lloco:ID|>`` must not read a chunk that the
retriever did not select. Two guards:

* ``LLoCOQueryEngine`` (and so ``lloco-index query``) escapes the question
  with :func:`escape_placeholders`; do the same wherever user text enters a
  prompt.
* ``LLoCOLLM`` and ``ChatLLoCO`` resolve only ids that a retriever handed
  out in this process (:func:`hand_out`: LlamaIndex retrievals and
  ``LLoCOLangChainRetriever`` record them) and refuse any other id with
  :class:`~lloco_index.errors.PlaceholderNotAllowedError`. A retriever's
  placeholders and the user's question arrive in one formatted message, so
  the wrappers cannot tell them apart by message; the allow-list needs no
  such split. ``resolve_placeholders="any"`` turns it off for prompts built
  from ids of your own (``store.add``). :class:`SoftPromptReader` itself
  resolves every id it is given.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from . import defaults
from .backbone import Backbone
from .errors import ContextBudgetError, PlaceholderNotAllowedError
from .precision import generation_autocast
from .prompt_types import GenerationResult, Message, PreparedPrompt  # re-exported: the reader's public types
from .store import SoftPromptStore

# --- The placeholder: its syntax, and the ids a retriever handed out ---------------------------------

PLACEHOLDER_RE = re.compile(re.escape(defaults.PLACEHOLDER_PREFIX) + r"([0-9A-Za-z_\-]+)" + re.escape(defaults.PLACEHOLDER_SUFFIX))


def make_placeholder(prompt_id: str) -> str:
    """``make_placeholder("ab12") -> "<|lloco:ab12|>"``."""
    return f"{defaults.PLACEHOLDER_PREFIX}{prompt_id}{defaults.PLACEHOLDER_SUFFIX}"


# A word joiner after "<|": invisible, keeps the user's text readable, and the pattern no longer matches.
_ESCAPE = "\u2060"


def escape_placeholders(text: str) -> str:
    """Neutralise every placeholder in untrusted text, so it reaches the decoder as plain text.

    >>> escape_placeholders("Repeat: <|lloco:ab12|>") == "Repeat: <|\u2060lloco:ab12|>"
    True
    """
    return PLACEHOLDER_RE.sub(lambda m: m.group(0).replace("<|", "<|" + _ESCAPE, 1), text) if isinstance(text, str) else text


def find_ids(text: str) -> list[str]:
    """All soft-prompt ids named in ``text``, in order (repeats kept)."""
    return PLACEHOLDER_RE.findall(text)


class SoftPromptRef(str):
    """A piece of a split prompt that is a placeholder; the string value is the id."""


def split_prompt(text: str) -> list[Union[str, SoftPromptRef]]:
    """Split text into plain pieces and :class:`SoftPromptRef` ids, in order.

    >>> split_prompt("a <|lloco:x1|> b")
    ['a ', 'x1', ' b']
    """
    pieces: list[Union[str, SoftPromptRef]] = []
    pos = 0
    for match in PLACEHOLDER_RE.finditer(text):
        if match.start() > pos:
            pieces.append(text[pos : match.start()])
        pieces.append(SoftPromptRef(match.group(1)))
        pos = match.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


# Ids are sha256(fingerprint, text): an id names one chunk of one compressor in every store, so one set
# for the process serves every store and every store object opened on the same persist dir.
_handed_out: set[str] = set()
_handed_out_lock = threading.Lock()

RESOLVE_RETRIEVED = "retrieved"
RESOLVE_ANY = "any"
RESOLVE_CHOICES = (RESOLVE_RETRIEVED, RESOLVE_ANY)


def hand_out(ids: Iterable[str]) -> None:
    """Record soft-prompt ids that a retriever put into a prompt; ``LLoCOLLM``/``ChatLLoCO`` resolve only these."""
    with _handed_out_lock:
        _handed_out.update(str(i) for i in ids)


def was_handed_out(prompt_id: str) -> bool:
    with _handed_out_lock:
        return prompt_id in _handed_out


def check_handed_out(ids: Iterable[str], reader_name: str) -> None:
    """Refuse the first id that no retriever handed out in this process (``PlaceholderNotAllowedError``)."""
    with _handed_out_lock:
        refused = next((i for i in ids if i not in _handed_out), None)
    if refused is not None:
        # Worded the same whether or not the store holds the id: the error is no oracle for guessed chunks.
        raise PlaceholderNotAllowedError(
            f"The prompt names soft prompt '{refused}', which no retriever handed out in this process; {reader_name} "
            f"reads only soft prompts that retrieval put into the prompt, so that text from a user cannot read "
            f"other chunks. Escape user text with lloco_index.escape_placeholders; for prompts you "
            f"build yourself from ids you trust (e.g. from store.add), pass resolve_placeholders='any'."
        )


def check_resolve_choice(value: str) -> str:
    if value not in RESOLVE_CHOICES:
        raise ValueError(f"resolve_placeholders must be one of {', '.join(map(repr, RESOLVE_CHOICES))}, got {value!r}.")
    return value


# --- The reader ------------------------------------------------------------------------------------

AUTO = "auto"  # use the compressor's reader adapter when it ships one

Piece = Union[list[int], SoftPromptRef]  # a text piece's token ids, or the placeholder of a soft prompt


def embed_pieces(table: torch.nn.Embedding, pieces: Sequence[Piece],
                 soft: Callable[[SoftPromptRef], torch.Tensor]) -> list[torch.Tensor]:
    """Each piece's input embeddings, in order: text through the decoder's embedding ``table``, each
    placeholder replaced by ``soft(ref)`` (cast to the table's dtype and device; training keeps its gradient).

    The one splicing of soft prompts into a prompt: queries (:meth:`SoftPromptReader.prepare`) and every
    training objective and evaluation build their decoder inputs with it.
    """
    out: list[torch.Tensor] = []
    for piece in pieces:
        if isinstance(piece, SoftPromptRef):
            out.append(soft(piece).to(device=table.weight.device, dtype=table.weight.dtype))
        else:
            with torch.no_grad():  # the embedding table is never trained
                out.append(table(torch.tensor(piece, dtype=torch.long, device=table.weight.device)))
    return out


class SoftPromptReader:
    """Read prompts that contain ``<|lloco:ID|>`` placeholders with a decoder.

    >>> reader = SoftPromptReader(compressor.backbone, store, adapter="auto", compressor=compressor)
    >>> reader.generate([{"role": "user", "content": f"Context: {placeholder}\\nQ: who?"}])
    """

    # The LLM wrappers' BatchingQueue runs this reader's left-padded Hugging Face batches; a backend that
    # batches concurrent requests itself (vLLM) sets False, and the wrappers then hand it each call as it comes.
    queue_batching = True

    def __init__(
        self,
        backbone: Backbone,
        store: Optional[SoftPromptStore] = None,
        *,
        compressor=None,
        adapter: Optional[str] = AUTO,
        max_new_tokens: int = defaults.DEFAULT_MAX_NEW_TOKENS,
        system_prompt: Optional[str] = None,
    ):
        self.backbone = backbone
        self.store = store
        self.compressor = compressor
        self.default_adapter = adapter
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt

    def new_tokens(self, max_new_tokens: Optional[int] = None) -> int:
        """The answer length to use: a per-call value (0 included) wins over the reader's default."""
        value = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(value, int) or value < 1:
            raise ContextBudgetError(
                f"max_new_tokens must be a whole number of at least 1, got {value!r}: it bounds the answer's length."
            )
        return value

    # ------------------------------------------------------------- adapters
    def resolve_adapter(self, adapter: Optional[str] = AUTO) -> Optional[str]:
        adapter = self.default_adapter if adapter == AUTO else adapter
        if adapter == AUTO:
            return self.compressor.reader_adapter if self.compressor is not None else None
        return adapter

    # ------------------------------------------------------------ templates
    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text the decoder reads (placeholders still in it)."""
        messages = list(messages)
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        tok = self.backbone.tokenizer
        fmt = self.compressor.prompt_format if self.compressor is not None else "chat"
        if fmt == "chat" and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        body = "\n\n".join(m["content"] for m in messages)
        if fmt == "plain":  # LLoCO's layout for AutoCompressor summaries: no BOS, no template
            return body
        # A chat-format compressor on a base model without a template: plain text after BOS.
        return (tok.bos_token or "") + body

    def text_ids(self, text: str) -> list[int]:
        return self.backbone.tokenize(text)

    def count_positions(self, text: str) -> int:
        """Positions ``text`` takes in the decoder: its tokens plus each soft prompt's real length."""
        total = 0
        for piece in split_prompt(text):
            if isinstance(piece, SoftPromptRef):
                total += self._store().num_positions(piece)
            else:
                total += len(self.text_ids(piece))
        return total

    def _store(self) -> SoftPromptStore:
        if self.store is None:
            raise ContextBudgetError("This prompt contains soft-prompt placeholders but the reader has no SoftPromptStore.")
        return self.store

    # -------------------------------------------------------------- inputs
    def prompt_pieces(self, messages: Sequence[Message]) -> list[Piece]:
        """The rendered prompt as the decoder reads it: token ids of each text piece, and placeholder refs.

        :meth:`prepare` embeds these pieces; training builds its inputs from the same pieces, so a
        compressor and its reader are trained on exactly the prompt a query sends.
        """
        out: list[Piece] = []
        for piece in split_prompt(self.render(messages)):
            if isinstance(piece, SoftPromptRef):
                out.append(piece)
            else:
                ids = self.text_ids(piece)
                if ids:
                    out.append(ids)
        return out

    def answer_ids(self, messages: Sequence[Message], answer: str, max_tokens: Optional[int] = None) -> list[int]:
        """Token ids the decoder must produce after the rendered ``messages`` to answer ``answer``.

        The answer as the chat template closes it (for SmolLM2 ``answer + <|im_end|>``: everything the
        template appends after the generation prompt, up to and including the first end-of-sequence
        token, where generation stops), cut to ``max_tokens`` (``None``: whole). The training target of
        every adapter and compressor trained on queries.
        """
        tok = self.backbone.tokenizer
        eos = tok.eos_token_id
        prompt = self.render(messages)
        ids: Optional[list[int]] = None
        if getattr(tok, "chat_template", None):
            full_messages = list(messages)
            if self.system_prompt and not any(m["role"] == "system" for m in full_messages):
                full_messages = [{"role": "system", "content": self.system_prompt}] + full_messages
            full = tok.apply_chat_template(full_messages + [{"role": "assistant", "content": answer}], tokenize=False)
            if full.startswith(prompt):
                ids = self.text_ids(full[len(prompt):])
                if eos is not None and eos in ids:
                    ids = ids[: ids.index(eos) + 1]
        if ids is None:  # no chat template, or one that rewrites earlier turns: answer + EOS
            ids = self.text_ids(answer) + ([eos] if eos is not None else [])
        return ids if max_tokens is None else ids[:max_tokens]

    def prepare(self, messages: Sequence[Message], *, max_new_tokens: Optional[int] = None) -> PreparedPrompt:
        """Build ``inputs_embeds`` for the rendered messages; unknown ids raise UnknownPlaceholderError."""
        table = self.backbone.embedding_table()
        pieces = self.prompt_pieces(messages)
        used = [str(p) for p in pieces if isinstance(p, SoftPromptRef)]

        def stored(ref: SoftPromptRef) -> torch.Tensor:
            soft = self._store().get(ref)
            if soft.shape[-1] != table.weight.shape[1]:
                raise ContextBudgetError(
                    f"Soft prompt '{ref}' has hidden size {soft.shape[-1]} but the decoder expects "
                    f"{table.weight.shape[1]}: the store belongs to another model."
                )
            return soft

        parts = embed_pieces(table, pieces, stored)
        soft_positions = sum(t.shape[0] for p, t in zip(pieces, parts) if isinstance(p, SoftPromptRef))
        text_positions = sum(len(p) for p in pieces if not isinstance(p, SoftPromptRef))
        embeds = torch.cat(parts, dim=0).unsqueeze(0)
        prepared = PreparedPrompt(embeds, text_positions, soft_positions, used)
        new_tokens = self.new_tokens(max_new_tokens)
        limit = self.backbone.context_window - new_tokens
        if prepared.positions > limit:
            raise ContextBudgetError(
                f"The prompt takes {prepared.positions} positions ({soft_positions} of soft prompts) but the model's "
                f"window leaves {limit} after {new_tokens} new tokens. Retrieve fewer "
                f"chunks (lower top_k or the retriever's position_budget) or shorten the prompt."
            )
        return prepared

    # ----------------------------------------------------------- generation
    def generate_kwargs(self, prepared: PreparedPrompt, max_new_tokens: Optional[int] = None) -> dict:
        """Keyword arguments for ``model.generate`` on ``prepared``: greedy, the tokenizer's EOS and pad ids.

        Callers that drive ``generate`` themselves (batching) start from these and override what they need.
        """
        tok = self.backbone.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        return dict(
            inputs_embeds=prepared.inputs_embeds,
            attention_mask=torch.ones(prepared.inputs_embeds.shape[:2], dtype=torch.long, device=prepared.inputs_embeds.device),
            max_new_tokens=self.new_tokens(max_new_tokens),
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0),
            eos_token_id=eos or None,
        )

    def generate(self, messages: Sequence[Message], *, adapter: Optional[str] = AUTO,
                 max_new_tokens: Optional[int] = None) -> GenerationResult:
        """Greedy answer to ``messages`` (new text only)."""
        start = time.perf_counter()
        prepared = self.prepare(messages, max_new_tokens=max_new_tokens)
        result = self.generate_prepared(prepared, adapter=adapter, max_new_tokens=max_new_tokens)
        result.total_s = time.perf_counter() - start
        return result

    def generate_prepared(self, prepared: PreparedPrompt, *, adapter: Optional[str] = AUTO,
                          max_new_tokens: Optional[int] = None,
                          stopping_criteria: Optional[Sequence[Callable[..., torch.Tensor]]] = None) -> GenerationResult:
        """Greedy answer to an already :meth:`prepare`-d prompt, always with the HF decoder.

        ``stopping_criteria`` are transformers ``StoppingCriteria`` callables
        ``(input_ids, scores) -> bool tensor per row``, checked after every new
        token besides EOS and ``max_new_tokens`` (e.g. a clock that notes the
        first token, or a stop at the first line break).
        """
        start = time.perf_counter()
        kwargs = self.generate_kwargs(prepared, max_new_tokens)
        if stopping_criteria:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList(list(stopping_criteria))
        with torch.inference_mode(), self.backbone.using(self.resolve_adapter(adapter)) as model, generation_autocast(self.backbone.device):
            out = model.generate(**kwargs)
        # generate(inputs_embeds=...) returns only the new tokens.
        new = out[0]
        text = self.backbone.tokenizer.decode(new, skip_special_tokens=True)
        return GenerationResult(text=text.strip(), prompt=prepared, new_tokens=int(new.shape[0]), total_s=time.perf_counter() - start)

    def generate_batch(self, list_of_messages: Sequence[Sequence[Message]], *, adapter: Optional[str] = AUTO,
                       max_new_tokens: Optional[int] = None, batch_size: int = 8,
                       progress: Union[bool, str] = False) -> list[GenerationResult]:
        """Greedy answers to many prompts, ``batch_size`` at a time (left-padded ``inputs_embeds``).

        Same answers as calling :meth:`generate` on each, in input order, at a
        fraction of the time per answer; ``progress`` shows a bar (a string names it).
        See :mod:`lloco_index.serving.batching`.

        >>> [r.text for r in reader.generate_batch([msgs_a, msgs_b], adapter=None, max_new_tokens=32)]
        """
        from .serving.batching import generate_batch

        return generate_batch(self, list_of_messages, adapter=adapter, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, progress=progress)

    batch = generate_batch  # the name batch-style runners (and LangChain users) look for

    def stream(self, messages: Sequence[Message], *, adapter: Optional[str] = AUTO,
               max_new_tokens: Optional[int] = None) -> Iterator[str]:
        """Yield text deltas as they are generated."""
        from transformers import TextIteratorStreamer

        prepared = self.prepare(messages, max_new_tokens=max_new_tokens)
        streamer = TextIteratorStreamer(self.backbone.tokenizer, skip_prompt=False, skip_special_tokens=True, timeout=600)
        resolved = self.resolve_adapter(adapter)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), self.backbone.using(resolved) as model, generation_autocast(self.backbone.device):
                    model.generate(**self.generate_kwargs(prepared, max_new_tokens), streamer=streamer)
            except BaseException as exc:  # surfaced in the caller's thread
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        # Same text as generate(), which strips: drop leading whitespace, hold trailing whitespace back
        # until more text follows it.
        started, held = False, ""
        for delta in streamer:
            if not started:
                delta = delta.lstrip()
                started = bool(delta)
            text = held + delta
            core = text.rstrip()
            held = text[len(core):]
            if core:
                yield core
        thread.join()
        if errors:
            raise errors[0]

    def score_options(self, messages: Sequence[Message], options: Sequence[str], *, adapter: Optional[str] = AUTO) -> list[float]:
        """Mean log-likelihood of each option as the assistant's answer (multiple-choice scoring).

        >>> reader.score_options([{"role": "user", "content": "Sky colour? (A) blue (B) red"}], ["(A) blue", "(B) red"])
        """
        return self.score_prepared_options(self.prepare(messages), options, adapter=adapter)

    def score_prepared_options(self, prepared: PreparedPrompt, options: Sequence[str], *,
                               adapter: Optional[str] = AUTO) -> list[float]:
        """:meth:`score_options` for an already prepared prompt, which is read once.

        The prompt's KV cache is computed once and cropped back after each
        option, so a long context costs one prefill, not one per option. An
        option with no tokens scores ``-inf``.
        """
        table = self.backbone.embedding_table()
        scores: list[float] = []
        with torch.inference_mode(), self.backbone.using(self.resolve_adapter(adapter)) as model, generation_autocast(self.backbone.device):
            # transformers 5 renamed past_key_values to cache (argument and output); accept both.
            cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            out = model(inputs_embeds=prepared.inputs_embeds, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            last_logits = out.logits[0, -1].float()
            for option in options:
                ids = torch.tensor(self.text_ids(option), dtype=torch.long, device=table.weight.device)
                if ids.numel() == 0:
                    scores.append(float("-inf"))
                    continue
                step = model(inputs_embeds=table(ids).unsqueeze(0), use_cache=True, **{cache_arg: cache})
                logits = torch.cat([last_logits.unsqueeze(0), step.logits[0, :-1].float()], 0)
                logp = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                scores.append(float(logp.mean()))
                cache.crop(-len(ids))  # back to the prompt alone for the next option
        return scores

    def question_loglik(self, question: str, prompt_id: str, *, adapter: Optional[str] = AUTO) -> float:
        """Mean log-likelihood of ``question``'s tokens right after one soft prompt (no template).

        How well a compressed chunk predicts the question: the query-aware ranking of
        :func:`lloco_index.selection.likelihood_scores`. One forward pass of the soft prompt plus the question.
        """
        table = self.backbone.embedding_table()
        ids = self.text_ids(" " + question.strip())
        if not ids:
            return float("-inf")
        soft = self._store().get(prompt_id).to(device=table.weight.device, dtype=table.weight.dtype)
        ids_t = torch.tensor(ids, dtype=torch.long, device=table.weight.device)
        with torch.inference_mode(), self.backbone.using(self.resolve_adapter(adapter)) as model, generation_autocast(self.backbone.device):
            embeds = torch.cat([soft, table(ids_t)], 0).unsqueeze(0)
            logits = model(inputs_embeds=embeds).logits[0, soft.shape[0] - 1:-1].float()
            return float(torch.log_softmax(logits, -1).gather(-1, ids_t.unsqueeze(-1)).mean())
