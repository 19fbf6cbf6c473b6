"""LlamaIndex adapter on a tiny random decoder and the real local embedder."""

from __future__ import annotations

from collections import Counter

import pytest
from llama_index.core import Document
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from llama_index.core.storage.docstore import SimpleDocumentStore

from lloco_index.compressors import ICAECompressor, ICAEConfig
from lloco_index.errors import EmptyDocumentError, StoreMismatchError
from lloco_index.llamaindex import LLoCOLLM, LLoCONodeParser, LLoCOQueryEngine, LLoCORetriever, build_index, load_index
from lloco_index.llamaindex.node_keys import CHUNK_KEY, DOC_KEY, ID_KEY, SOFT_PROMPT_KEY
from lloco_index.generation import find_ids
from lloco_index.store import SoftPromptStore

TOPICS = ["lighthouses guide ships", "bees make honey from nectar", "bicycles have two wheels", "volcanoes erupt lava"]
DOCS = [Document(text=" ".join(f"Sentence {i} says that {t}." for i in range(40)), metadata={"title": t}) for t in TOPICS]


@pytest.fixture
def compressor(backbone):
    return ICAECompressor(backbone, ICAEConfig(n_slots=8, segment_length=32, pooling="mean", lora_r=4, lora_alpha=8))


@pytest.fixture(scope="module")
def embed_model():
    from lloco_index.llamaindex import default_embed_model

    return default_embed_model()


def test_node_parser_in_ingestion_pipeline(compressor):
    parser = LLoCONodeParser(compressor)
    nodes = IngestionPipeline(transformations=[parser]).run(documents=DOCS[:2])
    assert len(nodes) > 4
    for node in nodes:
        assert node.get_content(MetadataMode.LLM) == node.metadata[SOFT_PROMPT_KEY]
        assert node.get_content(MetadataMode.EMBED) == node.text and "Sentence" in node.text
        assert node.metadata[ID_KEY] in parser.store
        assert node.metadata["title"] in TOPICS  # document metadata kept, but hidden from the LLM and embedder
    # Chunks cover each document in order.
    first_doc = [n for n in nodes if n.metadata[DOC_KEY] == nodes[0].metadata[DOC_KEY]]
    assert [n.metadata[CHUNK_KEY] for n in first_doc] == list(range(len(first_doc)))
    assert "".join(n.text for n in first_doc) == DOCS[0].text


def test_placeholder_view_survives_docstore_persistence(compressor, tmp_path):
    nodes = LLoCONodeParser(compressor).get_nodes_from_documents(DOCS[:1])
    docstore = SimpleDocumentStore()
    docstore.add_documents(nodes)
    docstore.persist(str(tmp_path / "docstore.json"))
    reloaded = SimpleDocumentStore.from_persist_path(str(tmp_path / "docstore.json")).get_node(nodes[0].node_id)
    assert type(reloaded) is TextNode
    assert reloaded.get_content(MetadataMode.LLM) == nodes[0].metadata[SOFT_PROMPT_KEY]


def test_empty_documents(compressor):
    with pytest.warns(UserWarning, match="empty or whitespace-only"):
        nodes = LLoCONodeParser(compressor).get_nodes_from_documents([Document(text=" \n "), DOCS[0]])
    assert nodes
    with pytest.raises(EmptyDocumentError, match="nothing to compress"):
        LLoCONodeParser(compressor, on_empty="error").get_nodes_from_documents([Document(text="")])


def _nws(node_id, prompt_id, doc, chunk, score, positions=8):
    node = TextNode(id_=node_id, text=f"text {node_id}", metadata={
        SOFT_PROMPT_KEY: f"<|lloco:{prompt_id}|>", ID_KEY: prompt_id, DOC_KEY: doc, CHUNK_KEY: chunk, "lloco_positions": positions})
    return NodeWithScore(node=node, score=score)


def test_retriever_dedupes_budgets_and_orders():
    results = [
        _nws("n1", "p1", "docB", 3, 0.9),
        _nws("n2", "p2", "docA", 5, 0.8),
        _nws("n3", "p1", "docB", 3, 0.7),  # duplicate soft prompt
        _nws("n4", "p4", "docB", 1, 0.6),
        _nws("n5", "p5", "docA", 0, 0.5),
        _nws("n6", "p6", "docC", 0, 0.4),  # over budget
    ]
    retriever = LLoCORetriever(retriever=None, store=None, position_budget=32, expand_top_k=0)
    kept = retriever.select(results)
    assert [r.node.node_id for r in kept] == ["n4", "n1", "n5", "n2"]  # best document first, reading order inside


def _spy_soft_prompts(llm):
    seen: list[str] = []
    original = llm.reader.prepare

    def prepare(messages, **kwargs):
        prepared = original(messages, **kwargs)
        seen.extend(prepared.soft_prompt_ids)
        return prepared

    llm.reader.prepare = prepare
    return seen


@pytest.fixture(scope="module")
def built_index(embed_model):
    from tiny_models import tiny_backbone

    compressor = ICAECompressor(tiny_backbone(), ICAEConfig(n_slots=8, segment_length=32, pooling="mean", lora_r=4, lora_alpha=8))
    index, store = build_index(DOCS, compressor, embed_model=embed_model)
    return compressor, index, store


@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize", "simple_summarize"])
def test_every_retrieved_soft_prompt_is_delivered_exactly_once(built_index, mode):
    compressor, index, store = built_index
    # A small window forces compact/refine/tree_summarize to spread chunks over several calls.
    window = 260 if mode != "simple_summarize" else 1024
    llm = LLoCOLLM(compressor, store, max_new_tokens=2, context_window=window)
    seen = _spy_soft_prompts(llm)
    engine = LLoCOQueryEngine.from_index(index, llm, response_mode=mode, similarity_top_k=12, position_budget=96,
                                         expand_top_k=0)
    response = engine.query("What do bees make?")
    retrieved = [n.node.metadata[ID_KEY] for n in response.source_nodes]
    assert 0 < sum(store.num_positions(i) for i in retrieved) <= 96
    assert Counter(seen) == Counter(retrieved), f"{mode}: delivered {Counter(seen)} vs retrieved {retrieved}"


def test_build_persist_reload_and_refuse_other_compressor(compressor, backbone, embed_model, tmp_path):
    index, store = build_index(DOCS[:2], compressor, persist_dir=tmp_path, embed_model=embed_model)
    index2, store2, compressor2 = load_index(tmp_path, compressor, embed_model=embed_model)
    assert store2.ids() == store.ids()
    nodes = index2.as_retriever(similarity_top_k=2).retrieve("bees honey")
    assert all(find_ids(n.node.get_content(MetadataMode.LLM)) for n in nodes)
    other = ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=32, pooling="mean", lora_r=4, lora_alpha=8))
    with pytest.raises(StoreMismatchError):
        load_index(tmp_path, other, embed_model=embed_model)
    assert SoftPromptStore.open(tmp_path).ids() == store.ids()  # nothing lost by the refusal


def test_llm_chat_stream_and_counting(compressor, tmp_path):
    from llama_index.core.base.llms.types import ChatMessage

    store = SoftPromptStore.open(tmp_path, compressor)
    [pid] = store.add(["A chunk about lighthouses and ships at sea."], compressor)
    llm = LLoCOLLM(compressor, store, max_new_tokens=3, resolve_placeholders="any")  # an id of our own, not retrieved
    prompt = f"Context: <|lloco:{pid}|>\nQuestion: what?"
    assert llm.count_positions(prompt) == store.num_positions(pid) + len(compressor.backbone.tokenize("Context: ")) + len(
        compressor.backbone.tokenize("\nQuestion: what?"))
    assert len(llm.position_tokenizer()(prompt)) == llm.count_positions(prompt)
    full = llm.complete(prompt)
    assert full.additional_kwargs["soft_positions"] == store.num_positions(pid)
    streamed = list(llm.stream_complete(prompt))
    assert streamed[-1].text == full.text
    chat = llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=prompt)])
    # The system message reaches the reader: the answer is the reader's own for both messages.
    direct = llm.reader.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}])
    assert chat.message.content == direct.text
    assert chat.additional_kwargs["soft_positions"] == store.num_positions(pid)
    assert "Be brief." in llm.reader.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}])


def test_retriever_expands_the_best_chunk_to_its_text_in_a_copy():
    from llama_index.core.schema import MetadataMode

    results = [_nws("n1", "p1", "docB", 3, 0.9), _nws("n2", "p2", "docA", 5, 0.8), _nws("n3", "p3", "docB", 1, 0.6)]
    retriever = LLoCORetriever(retriever=None, store=None, position_budget=None, expand_top_k=1,
                               text_positions=lambda text: 3)
    before = results[0].node.get_content(MetadataMode.LLM)
    kept = retriever.select(results)
    views = {r.node.node_id: r.node.get_content(MetadataMode.LLM) for r in kept}
    assert views == {"n1": "text n1", "n2": "<|lloco:p2|>", "n3": "<|lloco:p3|>"}
    assert [r.node.node_id for r in kept] == ["n3", "n1", "n2"]
    assert results[0].node.get_content(MetadataMode.LLM) == before  # the retriever's own node is untouched
    assert [r.node.metadata["lloco_expanded"] for r in kept] == [False, True, False]
    # A per-call override (what the finetune data builder uses for its mixes).
    assert all(r.node.get_content(MetadataMode.LLM).startswith("<|") for r in retriever.select(results, expand_top_k=0))


def test_query_engine_sends_the_expanded_text_and_the_other_soft_prompts(built_index):
    compressor, index, store = built_index
    llm = LLoCOLLM(compressor, store, max_new_tokens=4)
    seen = _spy_soft_prompts(llm)
    prompts: list[str] = []
    original = llm.reader.prepare

    def prepare(messages, **kwargs):
        prompts.append(llm.reader.render(messages))
        return original(messages, **kwargs)

    llm.reader.prepare = prepare
    engine = LLoCOQueryEngine.from_index(index, llm, similarity_top_k=3, expand_top_k=1)
    response = engine.query("What do bees make?")
    expanded = [n for n in response.source_nodes if n.node.metadata.get("lloco_expanded")]
    soft = [n for n in response.source_nodes if not n.node.metadata.get("lloco_expanded")]
    assert len(expanded) == 1 and len(soft) == len(response.source_nodes) - 1
    assert expanded[0].node.text.strip() in "".join(prompts)  # the text itself, not its placeholder
    assert expanded[0].node.metadata["lloco_id"] not in seen
    assert {n.node.metadata["lloco_id"] for n in soft} <= set(seen)


def test_llm_fields_changed_after_construction_reach_generation(built_index):
    compressor, index, store = built_index
    llm = LLoCOLLM(compressor, store, max_new_tokens=6)
    llm.max_new_tokens = 2
    out = llm.complete("Say something long about bees.")
    assert out.additional_kwargs["new_tokens"] <= 2 and llm.metadata.num_output == 2


def test_faiss_index_takes_the_embedders_width(compressor):
    from llama_index.core.embeddings import MockEmbedding

    index, store = build_index(DOCS[:1], compressor, embed_model=MockEmbedding(embed_dim=16))
    assert index.vector_store._faiss_index.d == 16
    assert index.as_retriever(similarity_top_k=1).retrieve("bees")


# ------------------------------------------------ bad input reaching the selection policy through LlamaIndex


def _store_with(*prompt_ids, positions=8):
    import torch

    store = SoftPromptStore("fp-test")
    store.put({pid: torch.zeros(positions, 4) for pid in prompt_ids})
    return store


def _views(nodes):
    return [(r.node.node_id, r.node.get_content(MetadataMode.LLM)) for r in nodes]


def test_retriever_bad_input_gets_the_documented_fallback_never_a_cut_chunk():
    from lloco_index.errors import UnknownPlaceholderError

    results = [_nws("n1", "p1", "d", 0, 0.9), _nws("n2", "p2", "d", 1, 0.8), _nws("n3", "p3", "d", 2, 0.7)]
    store = _store_with("p1", "p2", "p3")
    # expand_top_k larger than what was retrieved: every retrieved chunk as its text.
    many = LLoCORetriever(retriever=None, store=store, position_budget=None, expand_top_k=5, text_positions=lambda t: 3)
    assert _views(many.select(results)) == [("n1", "text n1"), ("n2", "text n2"), ("n3", "text n3")]
    # A text budget smaller than one chunk: nothing expanded, every chunk whole as its soft prompt.
    small = LLoCORetriever(retriever=None, store=store, position_budget=None, expand_top_k=1, text_budget=2,
                           text_positions=lambda t: 3)
    assert _views(small.select(results)) == [("n1", "<|lloco:p1|>"), ("n2", "<|lloco:p2|>"), ("n3", "<|lloco:p3|>")]
    # A node whose text was dropped from the docstore: it stays a soft prompt; the next best is expanded instead.
    dropped = [_nws("n1", "p1", "d", 0, 0.9), *results[1:]]
    dropped[0].node.text = ""
    one = LLoCORetriever(retriever=None, store=store, position_budget=None, expand_top_k=1, text_positions=lambda t: 3)
    assert _views(one.select(dropped)) == [("n1", "<|lloco:p1|>"), ("n2", "text n2"), ("n3", "<|lloco:p3|>")]
    # A chunk whose soft prompt is missing from the store is read as its text (even with expand_top_k=0) ...
    gone = LLoCORetriever(retriever=None, store=_store_with("p2", "p3"), position_budget=None, expand_top_k=0,
                          text_positions=lambda t: 3)
    assert _views(gone.select(results)) == [("n1", "text n1"), ("n2", "<|lloco:p2|>"), ("n3", "<|lloco:p3|>")]
    # ... and refused precisely when its text is gone too.
    with pytest.raises(UnknownPlaceholderError, match="neither a soft prompt in the store nor its text"):
        gone.select(dropped)


@pytest.mark.parametrize("kwargs", [dict(expand_top_k=-1), dict(text_budget=-1), dict(top_k=-3), dict(position_budget=-8)])
def test_retriever_refuses_negative_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LLoCORetriever(retriever=None, store=None, **kwargs)


def test_retriever_refuses_a_negative_per_call_expansion():
    retriever = LLoCORetriever(retriever=None, store=None, position_budget=None)
    with pytest.raises(ValueError, match="expand_top_k must be a whole number >= 0"):
        retriever.select([_nws("n1", "p1", "d", 0, 0.9)], expand_top_k=-2)
