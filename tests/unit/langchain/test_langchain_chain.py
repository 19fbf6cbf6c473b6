"""The LangChain adapter end to end: the LCEL RAG chain, streaming, adapters, errors, retrieval policy.

Fast tests run on the tiny random LLaMA with the identity compressor (64-token
segments); the one ``integration`` test runs the real SmolLM2 and checks that
the chain answers exactly as the plain model reading the same text.
"""

from __future__ import annotations

import asyncio
import json
import warnings
from pathlib import Path

import pytest
import torch
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough

from conftest_langchain import CORPUS, METADATAS, make_tiny_backbone, tiny_backbone, tiny_chunk_index, tiny_compressor
from lloco_index.errors import CorruptStoreError, EmptyDocumentError, StoreMismatchError, UnknownPlaceholderError
from lloco_index.langchain import ChatLLoCO, LLoCOLangChainRetriever
from lloco_index.generation import make_placeholder

QUESTION = "How tall is the Eiffel Tower?"
PROMPT = ChatPromptTemplate.from_template("Answer from the context.\n\nContext:\n{context}\n\nQuestion: {question}")


def format_docs(docs: list[Document]) -> str:
    """The format_docs of LangChain's RAG tutorial, verbatim."""
    return "\n\n".join(doc.page_content for doc in docs)


def rag_chain(retriever, llm, docs_formatter=format_docs):
    """The documented LCEL RAG pattern, unchanged."""
    return {"context": retriever | docs_formatter, "question": RunnablePassthrough()} | PROMPT | llm | StrOutputParser()


@pytest.fixture(scope="module")
def persisted(tmp_path_factory) -> tuple[Path, LLoCOLangChainRetriever]:
    persist_dir = tmp_path_factory.mktemp("lc-store")
    # expand_top_k=0: these tests read soft prompts only (expansion has its own test below).
    retriever = LLoCOLangChainRetriever.from_texts(CORPUS, tiny_compressor(), persist_dir, METADATAS, k=3, expand_top_k=0)
    return persist_dir, retriever


@pytest.fixture(scope="module")
def llm(persisted) -> ChatLLoCO:
    return ChatLLoCO.from_retriever(persisted[1], max_tokens=8)


# ----------------------------------------------------------------------------- chain
def test_lcel_rag_chain_reads_the_retrieved_soft_prompts(persisted, llm):
    _, retriever = persisted
    answer = rag_chain(retriever, llm).invoke(QUESTION)
    assert answer.strip()  # and equal to the message read through the same chain, below

    docs = retriever.invoke(QUESTION)
    message = ({"context": retriever | format_docs, "question": RunnablePassthrough()} | PROMPT | llm).invoke(QUESTION)
    info = message.response_metadata["lloco"]
    assert info["soft_prompt_ids"] == [d.metadata["lloco_id"] for d in docs]
    assert info["soft_prompt_positions"] == sum(d.metadata["lloco_positions"] for d in docs)
    assert message.content == answer


def test_identity_compressor_answers_like_the_text(persisted, llm):
    """Placeholders spliced as identity soft prompts == the same chunks given as text (same tokens, same answer)."""
    _, retriever = persisted
    docs = retriever.invoke(QUESTION)
    # One newline between chunks: a run of whitespace at a splice is tokenised alone ("\n\n" -> one token) but
    # merges differently before a word in running text; single separators tokenise the same either way.
    with_placeholders = PROMPT.invoke({"context": "\n".join(d.page_content for d in docs), "question": QUESTION})
    with_text = PROMPT.invoke({"context": "\n".join(d.metadata["lloco_text"] for d in docs), "question": QUESTION})
    reader = llm.reader
    spliced = reader.prepare(llm.to_reader_messages(with_placeholders.to_messages())).inputs_embeds
    plain = reader.prepare(llm.to_reader_messages(with_text.to_messages())).inputs_embeds
    assert spliced.shape == plain.shape and torch.equal(spliced, plain)
    assert llm.invoke(with_placeholders).content == llm.invoke(with_text).content


def test_stream_yields_pieces_that_add_up_to_invoke(persisted, llm):
    _, retriever = persisted
    chain = rag_chain(retriever, llm)
    pieces = list(chain.stream(QUESTION))
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == chain.invoke(QUESTION)

    chunks = list(llm.stream(QUESTION))
    assert chunks[-1].chunk_position == "last"
    assert chunks[-1].usage_metadata["input_tokens"] == llm.invoke(QUESTION).usage_metadata["input_tokens"]


def test_async_chain_matches_sync(persisted, llm):
    _, retriever = persisted
    chain = rag_chain(retriever, llm)

    async def run():
        answer = await chain.ainvoke(QUESTION)
        pieces = [p async for p in chain.astream(QUESTION)]
        return answer, "".join(pieces)

    answer, streamed = asyncio.run(run())
    assert answer == streamed == chain.invoke(QUESTION)


def test_messages_are_converted_with_roles(llm):
    messages = [SystemMessage("Be brief."), HumanMessage("hi"), AIMessage("hello"), HumanMessage([{"type": "text", "text": "and?"}])]
    assert llm.to_reader_messages(messages) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
    ]
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([HumanMessage([{"type": "image", "url": "https://example.com/x.png"}])])


# ------------------------------------------------------------------- per-call options
def test_per_call_adapter_via_invoke_kwarg_and_bind():
    from peft import LoraConfig

    backbone = make_tiny_backbone(seed=1)  # its own model: the adapter must not leak into other tests
    backbone.add_adapter("legal", LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False))
    model = ChatLLoCO(backbone=backbone, max_tokens=6)
    plain = model.invoke("Hello", adapter=None)
    legal = model.invoke("Hello", adapter="legal")
    assert legal.content != plain.content
    assert legal.response_metadata["lloco"]["adapter"] == "legal"
    assert model.bind(adapter="legal").invoke("Hello").content == legal.content
    assert "".join(c.content for c in model.stream("Hello", adapter="legal")) == legal.content
    assert model.invoke("Hello").content == plain.content  # "auto" with no reader adapter: the plain decoder
    with pytest.raises(KeyError, match="not loaded"):
        model.invoke("Hello", adapter="medical")


def test_unsupported_call_arguments_fail_loudly(llm):
    with pytest.raises(TypeError, match="unsupported call arguments"):
        llm.invoke("Hello", tools=[])
    with pytest.raises(ValueError, match="cannot switch to model"):
        llm.invoke("Hello", model="gpt-4o")
    with pytest.raises(NotImplementedError):
        llm.bind_tools([])


def test_stop_sequences_cut_invoke_and_stream_alike(llm):
    full = llm.invoke("Hello").content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    expected = full[: full.find(stop)].rstrip()
    assert llm.invoke("Hello", stop=[stop]).content == expected
    assert "".join(c.content for c in llm.stream("Hello", stop=[stop])) == expected
    bound = ChatLLoCO(backbone=llm.reader.backbone, store=llm.store, compressor=llm.compressor, max_tokens=8, stop=[stop])
    assert bound.invoke("Hello").content == expected


def test_usage_counts_text_and_soft_prompt_positions(persisted, llm):
    _, retriever = persisted
    doc = retriever.invoke(QUESTION)[0]
    message = llm.invoke(f"Context: {doc.page_content}\nSummarise it.")
    info = message.response_metadata["lloco"]
    assert info["soft_prompt_positions"] == doc.metadata["lloco_positions"] == llm.store.num_positions(doc.metadata["lloco_id"])
    assert message.usage_metadata["input_tokens"] == info["text_positions"] + info["soft_prompt_positions"]
    assert message.usage_metadata["output_tokens"] == 8
    assert message.response_metadata["finish_reason"] == "length"
    assert message.response_metadata["model_name"] == "tiny-test"


# -------------------------------------------------------------------------- errors
def test_unknown_placeholder_is_an_error_never_dropped(llm):
    bogus = make_placeholder("0" * 24)
    with pytest.raises(UnknownPlaceholderError, match="0{24}"):
        llm.invoke(f"Context: {bogus}\nQuestion: what?")
    with pytest.raises(UnknownPlaceholderError):
        list(llm.stream(f"Context: {bogus}"))
    with pytest.raises(UnknownPlaceholderError, match="no soft-prompt store"):
        ChatLLoCO(backbone=tiny_backbone()).invoke(f"Context: {bogus}")


def test_store_is_reopened_when_chunks_were_added_elsewhere(persisted):
    persist_dir, _ = persisted
    # The new id comes from add_texts, not from a retriever: a prompt of our own.
    model = ChatLLoCO.from_persist_dir(persist_dir, tiny_compressor(), max_tokens=4, resolve_placeholders="any")
    model.invoke("warm up")  # opens the store now, before the new chunk exists
    other = LLoCOLangChainRetriever(persist_dir=str(persist_dir), compressor=tiny_compressor())
    [new_id] = other.add_texts(["Kilimanjaro is the highest mountain in Africa."], [{"source": "late.txt"}])
    message = model.invoke(f"Context: {make_placeholder(new_id)}\nWhere is it?")
    assert message.response_metadata["lloco"]["soft_prompt_ids"] == [new_id]


def test_a_damaged_chunk_index_is_refused_and_names_the_intact_soft_prompts(tmp_path):
    persist_dir = tmp_path / "lc"
    LLoCOLangChainRetriever.from_texts(CORPUS[:2], tiny_compressor(), persist_dir, METADATAS[:2], k=1)
    (persist_dir / "lloco_langchain" / "chunks.json").write_bytes(b"\xff{not json")
    with pytest.raises(CorruptStoreError, match=r"chunks.json is corrupt .*soft prompts in .* are intact"):
        LLoCOLangChainRetriever(persist_dir=str(persist_dir), compressor=tiny_compressor()).invoke("anything")


def test_construction_errors_are_precise():
    with pytest.raises(ValueError, match="compressor=, backbone= or persist_dir="):
        ChatLLoCO()
    with pytest.raises(ValueError, match="not the compressor's backbone"):
        ChatLLoCO(compressor=tiny_compressor(), backbone=make_tiny_backbone(seed=2))


def test_default_falls_back_to_identity_compressor_with_a_warning(monkeypatch):
    import lloco_index.backbone as backbone_module
    from lloco_index.compressors import loading
    from lloco_index.errors import ModelNotFoundError

    def missing(*args, **kwargs):
        raise ModelNotFoundError("No compressor at 'pretrained/smollm2-135m-compressor'")

    monkeypatch.setattr(loading, "load_compressor", missing)
    monkeypatch.setattr(backbone_module.Backbone, "load", classmethod(lambda cls, *a, **k: tiny_backbone()))
    with pytest.warns(UserWarning, match="Using the identity TokenEmbeddingCompressor"):
        model = ChatLLoCO.default()
    assert model.compressor.config.mode == "token_embedding"


# ------------------------------------------------------------------------ retriever
def test_documents_carry_placeholder_and_metadata_in_reading_order():
    retriever = LLoCOLangChainRetriever(index=tiny_chunk_index(), k=3, expand_top_k=0)
    docs = retriever.invoke(QUESTION)
    assert len(docs) == 3
    for doc in docs:
        assert doc.page_content == make_placeholder(doc.metadata["lloco_id"])
        assert {"lloco_text", "lloco_doc_id", "lloco_chunk", "lloco_positions", "lloco_score", "source"} <= set(doc.metadata)
    # Chunks of one document stay together and in document order.
    order = [(d.metadata["lloco_doc_id"], d.metadata["lloco_chunk"]) for d in docs]
    by_doc: dict[str, list[int]] = {}
    for doc_id, chunk in order:
        by_doc.setdefault(doc_id, []).append(chunk)
    assert all(chunks == sorted(chunks) for chunks in by_doc.values())
    assert [doc_id for doc_id, _ in order] == sorted((doc_id for doc_id, _ in order), key=list(by_doc).index)
    # The long first document is cut at the compressor's segment length and its chunks cover it exactly.
    records = [r for r in tiny_chunk_index().records if r.metadata.get("source") == "doc0.txt"]
    assert len(records) > 1 and all(r.positions <= tiny_compressor().segment_length for r in records)
    assert "".join(r.text for r in sorted(records, key=lambda r: r.chunk)) == CORPUS[0]


def test_duplicates_are_dropped_and_budget_is_kept(tmp_path):
    text = "Saturn has the most extensive ring system of any planet in the Solar System."
    retriever = LLoCOLangChainRetriever.from_texts([text, text, CORPUS[1], CORPUS[2]], tiny_compressor(),
                                                   metadatas=[{"doc_id": "a"}, {"doc_id": "b"}, {}, {}], k=4)
    docs = retriever.invoke("Which planet has rings?")
    ids = [d.metadata["lloco_id"] for d in docs]
    assert len(ids) == len(set(ids)) == 3  # the same chunk under two documents is read once
    budget = docs[0].metadata["lloco_positions"] + 1
    small = retriever.invoke("Which planet has rings?", position_budget=budget)
    assert sum(d.metadata["lloco_positions"] for d in small) <= budget and small
    assert len(retriever.invoke("Which planet has rings?", k=1)) == 1


def test_persisted_index_reopens_and_refuses_mismatches(tmp_path):
    retriever = LLoCOLangChainRetriever.from_documents(
        [Document(page_content=CORPUS[1], id="fuji", metadata={"source": "fuji.txt"}), Document(page_content=CORPUS[3])],
        tiny_compressor(), tmp_path, k=2)
    before = retriever.invoke("volcano in Japan")
    assert before[0].metadata["lloco_doc_id"] == "fuji"
    reopened = LLoCOLangChainRetriever(persist_dir=str(tmp_path), k=2)
    assert [d.page_content for d in reopened.invoke("volcano in Japan")] == [d.page_content for d in before]
    manifest = json.loads((tmp_path / "lloco_index.json").read_text())
    assert manifest["fingerprint"] == tiny_compressor().fingerprint

    # Lost embeddings are recomputed from the texts (the source of truth).
    for path in (tmp_path / "lloco_langchain").glob("embeddings-*.npy"):
        path.unlink()
    healed = LLoCOLangChainRetriever(persist_dir=str(tmp_path), k=2)
    assert [d.page_content for d in healed.invoke("volcano in Japan")] == [d.page_content for d in before]

    from lloco_index.compressors import TokenEmbeddingCompressor, TokenEmbeddingConfig

    other = TokenEmbeddingCompressor(tiny_backbone(), TokenEmbeddingConfig(segment_length=32))
    with pytest.raises(StoreMismatchError, match="compressor"):
        LLoCOLangChainRetriever(persist_dir=str(tmp_path), compressor=other)
    with pytest.raises(StoreMismatchError):
        ChatLLoCO(compressor=other, store=reopened.store)

    (tmp_path / "lloco_langchain" / "chunks.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match="rebuild the chunk index"):
        LLoCOLangChainRetriever(persist_dir=str(tmp_path))
    with pytest.raises(CorruptStoreError, match="missing"):
        LLoCOLangChainRetriever(persist_dir=str(tmp_path / "nowhere"))


def test_empty_documents_are_skipped_with_a_warning_or_refused():
    with pytest.warns(UserWarning, match="empty or whitespace-only"):
        retriever = LLoCOLangChainRetriever.from_texts(["", "   \n\t", CORPUS[4]], tiny_compressor(), k=2)
    assert len(retriever.index) == 1
    with pytest.raises(EmptyDocumentError):
        LLoCOLangChainRetriever.from_texts(["  "], tiny_compressor(), on_empty="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LLoCOLangChainRetriever.from_texts(["\u200b\u3000", CORPUS[4]], tiny_compressor(), on_empty="skip")
    with pytest.raises(ValueError, match="JSON"):
        LLoCOLangChainRetriever.from_texts([CORPUS[4]], tiny_compressor(), metadatas=[{"when": object()}])


# --------------------------------------------------------------------- integration
@pytest.mark.integration
def test_chain_on_smollm2_with_identity_compressor_equals_plain_model(smollm2, tmp_path):
    """Through the whole LangChain path, identity soft prompts give the plain model's greedy answer."""
    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.precision import generation_autocast

    compressor = TokenEmbeddingCompressor(smollm2)
    retriever = LLoCOLangChainRetriever.from_texts(CORPUS, compressor, tmp_path, METADATAS, k=2)
    llm = ChatLLoCO.from_retriever(retriever, max_tokens=16)  # the answer ends (EOS) within 16 tokens
    # Single-newline separator: see test_identity_compressor_answers_like_the_text.
    chain = rag_chain(retriever, llm, docs_formatter=lambda docs: "\n".join(d.page_content for d in docs))
    answer = chain.invoke(QUESTION)

    docs = retriever.invoke(QUESTION)
    assert docs[0].metadata["source"] == "doc0.txt"
    prompt = PROMPT.invoke({"context": "\n".join(d.metadata["lloco_text"] for d in docs), "question": QUESTION})
    tokenizer = smollm2.tokenizer
    text = tokenizer.apply_chat_template(llm.to_reader_messages(prompt.to_messages()), tokenize=False,
                                         add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    # using(None): the plain weights even when an earlier test loaded adapters into the shared decoder.
    with smollm2.using(None) as model, torch.inference_mode(), generation_autocast(smollm2.device):
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                          eos_token_id=tokenizer.eos_token_id)
    plain = tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer == plain and answer


def test_expanded_chunks_come_back_as_text_in_reading_order():
    retriever = LLoCOLangChainRetriever(index=tiny_chunk_index(), k=3, expand_top_k=1, policy="score")
    docs = retriever.invoke("Who kept the lighthouse?")
    expanded = [d for d in docs if d.metadata["lloco_expanded"]]
    assert len(expanded) == 1 and expanded[0].page_content == expanded[0].metadata["lloco_text"]
    assert all(d.page_content == f"<|lloco:{d.metadata['lloco_id']}|>" for d in docs if d not in expanded)
    best = max(docs, key=lambda d: d.metadata["lloco_score"])
    assert best is expanded[0]  # the score policy expands the best hit
    assert [d.page_content for d in retriever.invoke("Who kept the lighthouse?", expand_top_k=0)] == [
        f"<|lloco:{d.metadata['lloco_id']}|>" for d in docs]


def test_the_expansion_policy_chooses_which_chunk_comes_back_as_text():
    from lloco_index.selection import Candidate, lexical_scores

    question = "How tall is the tower in Paris, in metres?"  # two Eiffel chunks: the second-scored has more of its words
    expanded = {}
    for policy in ("score", "lexical"):
        docs = LLoCOLangChainRetriever(index=tiny_chunk_index(), k=3, expand_top_k=1, policy=policy).invoke(question)
        expanded[policy] = [d for d in docs if d.metadata["lloco_expanded"]]
        assert len(expanded[policy]) == 1
    scores = [d.metadata["lloco_score"] for d in docs]
    lexical = lexical_scores(question, [Candidate(str(i), "d", i, s, 1, 1, text=d.metadata["lloco_text"])
                                        for i, (d, s) in enumerate(zip(docs, scores))])
    assert expanded["score"][0].metadata["lloco_score"] == max(scores)
    assert expanded["lexical"][0].metadata["lloco_text"] == docs[lexical.index(max(lexical))].metadata["lloco_text"]
    assert expanded["lexical"][0].metadata["lloco_id"] != expanded["score"][0].metadata["lloco_id"]
    with pytest.raises(ValueError, match="pass reader=chat_model.reader"):
        LLoCOLangChainRetriever(index=tiny_chunk_index(), policy="likelihood")


def test_select_chunks_bad_input_gets_the_documented_fallback_never_a_cut_chunk():
    import torch

    from lloco_index.errors import UnknownPlaceholderError
    from lloco_index.langchain.search import ChunkRecord, SearchHit, select_chunks
    from lloco_index.selection import SelectionConfig
    from lloco_index.store import SoftPromptStore

    def hit(pid, chunk, score, text="some words here"):
        return SearchHit(ChunkRecord(pid, text, "d", chunk, positions=8, text_positions=5), score)

    store = SoftPromptStore("fp-test")
    store.put({p: torch.zeros(8, 4) for p in ("p1", "p2", "p3")})
    hits = [hit("p1", 0, 0.9), hit("p2", 1, 0.8), hit("p3", 2, 0.7)]

    def form(config, hs=hits, st=store):
        return [(h.record.soft_prompt_id, h.expanded) for h in select_chunks(hs, config, st)]

    # More to expand than was retrieved: all of it, as text.
    assert form(SelectionConfig(expand_top_k=9, position_budget=None)) == [("p1", True), ("p2", True), ("p3", True)]
    # A text budget smaller than one chunk: nothing expanded, nothing cut.
    assert form(SelectionConfig(expand_top_k=1, text_budget=4, position_budget=None)) == [
        ("p1", False), ("p2", False), ("p3", False)]
    # The best chunk's text is gone: it stays a soft prompt and the next one is expanded.
    dropped = [hit("p1", 0, 0.9, text=""), *hits[1:]]
    assert form(SelectionConfig(expand_top_k=1, position_budget=None), dropped) == [
        ("p1", False), ("p2", True), ("p3", False)]
    # A soft prompt missing from the store: read as text; with its text gone as well, refused.
    partial = SoftPromptStore("fp-test")
    partial.put({"p2": torch.zeros(8, 4), "p3": torch.zeros(8, 4)})
    assert form(SelectionConfig(expand_top_k=0, position_budget=None), st=partial) == [
        ("p1", True), ("p2", False), ("p3", False)]
    with pytest.raises(UnknownPlaceholderError, match="neither a soft prompt in the store nor its text"):
        form(SelectionConfig(expand_top_k=0, position_budget=None), dropped, partial)
