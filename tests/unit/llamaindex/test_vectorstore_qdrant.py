"""A production vector store beside faiss: Qdrant in local persistent mode (no server process).

Build an index whose vectors live in Qdrant, persist it, then reopen it in a new Python process (the
decoder, compressor, soft prompts and vectors all come from disk) and check that retrieval returns the same
placeholders and the query engine the same answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("qdrant_client", reason="the `vectorstores` extra (qdrant-client) is not installed")
pytest.importorskip("llama_index.vector_stores.qdrant", reason="the `vectorstores` extra is not installed")

from lloco_index.errors import StoreMismatchError  # noqa: E402

from helpers import DOCS  # noqa: E402

QUESTION = "What do bees make?"
COLLECTION = "lloco_test"

# Run in the test process and again in a fresh interpreter: retrieve, then answer, over the reopened index.
REOPEN = """
import json, sys, torch
torch.set_num_threads(1)
from qdrant_client import QdrantClient
from llama_index.vector_stores.qdrant import QdrantVectorStore
from lloco_index.llamaindex import LLoCOLLM, LLoCOQueryEngine, LLoCORetriever, load_index
from lloco_index.llamaindex.node_keys import ID_KEY

persist_dir, qdrant_dir, collection, question = sys.argv[1:5]
client = QdrantClient(path=qdrant_dir)
index, store, compressor = load_index(persist_dir, vector_store=QdrantVectorStore(client=client, collection_name=collection))
nodes = LLoCORetriever.from_index(index, store, similarity_top_k=2).retrieve(question)
llm = LLoCOLLM(compressor, store, max_new_tokens=8)
answer = LLoCOQueryEngine.from_index(index, llm, similarity_top_k=2).query(question)
print(json.dumps({"ids": [n.node.metadata[ID_KEY] for n in nodes], "answer": answer.response,
                  "fingerprint": compressor.fingerprint}))
client.close()
"""


def _run_here(persist_dir: Path, qdrant_dir: Path) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    saved = sys.argv
    sys.argv = ["reopen", str(persist_dir), str(qdrant_dir), COLLECTION, QUESTION]
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(REOPEN, "reopen", "exec"), {"__name__": "reopen"})
    finally:
        sys.argv = saved
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_qdrant_local_index_reopens_in_a_new_process(tmp_path):
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    from lloco_index.backbone import Backbone
    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.compressors.token_embedding import TokenEmbeddingConfig
    from lloco_index.llamaindex import build_index, default_embed_model, load_index
    from lloco_index.manifest import read_manifest

    from tiny_models import tiny_family_backbone

    # A decoder on disk, so that the new process can load the same weights.
    model_dir = tmp_path / "tiny-model"
    saved = tiny_family_backbone("llama", initializer_range=0.2)
    saved.base_model.save_pretrained(str(model_dir))
    saved.tokenizer.save_pretrained(str(model_dir))
    backbone = Backbone.load(model_dir)
    compressor = TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=32, base_model=backbone.identity))

    persist_dir, qdrant_dir = tmp_path / "storage", tmp_path / "qdrant"
    client = QdrantClient(path=str(qdrant_dir))
    index, store = build_index(DOCS, compressor, persist_dir=persist_dir, embed_model=default_embed_model(),
                               vector_store=QdrantVectorStore(client=client, collection_name=COLLECTION))
    assert client.count(COLLECTION).count == len(store.ids()) > 3
    client.close()  # local mode locks its folder: one client at a time
    assert read_manifest(persist_dir)["vector_store"] == "QdrantVectorStore"

    here = _run_here(persist_dir, qdrant_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[3] / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", REOPEN, str(persist_dir), str(qdrant_dir), COLLECTION, QUESTION],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(here["ids"]) == 2 and set(here["ids"]) <= set(store.ids())
    assert there == here and here["answer"].strip()
    bees = [n for n in index.docstore.docs.values() if "bees" in n.text]
    assert here["ids"][0] in {n.metadata["lloco_id"] for n in bees}

    # Reopening without the vector store it was built with is refused, not read as an empty faiss index.
    with pytest.raises(StoreMismatchError, match="QdrantVectorStore"):
        load_index(persist_dir)
