"""Writing into a persist dir: adding to an index, one writer at a time, repairs, and the CLI's input checks."""

from __future__ import annotations

import pytest
from llama_index.core import Document

from lloco_index.cli import main
from lloco_index.compressors import ICAECompressor, ICAEConfig
from lloco_index.errors import CorruptStoreError, PersistDirError, StoreLockedError
from lloco_index.fileio import exclusive_lock
from lloco_index.llamaindex import build_index, load_index
from lloco_index.llamaindex.documents import read_documents

TOPICS = ["lighthouses guide ships", "bees make honey from nectar", "bicycles have two wheels", "volcanoes erupt lava"]
DOCS = [Document(id_=f"doc-{i}", text=" ".join(f"Sentence {j} says that {t}." for j in range(12))) for i, t in enumerate(TOPICS)]


@pytest.fixture
def compressor(backbone):
    return ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=32, pooling="mean", lora_r=4, lora_alpha=8))


@pytest.fixture(scope="module")
def embed_model():
    from lloco_index.llamaindex import default_embed_model

    return default_embed_model()


def test_second_build_adds_documents(compressor, embed_model, tmp_path):
    build_index(DOCS[:2], compressor, persist_dir=tmp_path, embed_model=embed_model)
    build_index(DOCS[2:], compressor, persist_dir=tmp_path, embed_model=embed_model)
    index, store, _ = load_index(tmp_path, compressor, embed_model=embed_model)
    assert set(index.ref_doc_info) == {d.doc_id for d in DOCS}
    n_nodes = len(index.docstore.docs)
    build_index(DOCS, compressor, persist_dir=tmp_path, embed_model=embed_model)  # the same documents again
    again, _, _ = load_index(tmp_path, compressor, embed_model=embed_model)
    assert len(again.docstore.docs) == n_nodes  # nothing added twice
    same_text = [Document(text=d.text, metadata=d.metadata) for d in DOCS[:1]]  # same content, a fresh random id
    build_index(same_text, compressor, persist_dir=tmp_path, embed_model=embed_model)
    assert len(load_index(tmp_path, compressor, embed_model=embed_model)[0].docstore.docs) == n_nodes


def test_rerun_after_deleting_shards_repairs_the_index(compressor, embed_model, tmp_path):
    _, store = build_index(DOCS, compressor, persist_dir=tmp_path, embed_model=embed_model)
    ids = store.ids()
    for shard in (tmp_path / "lloco_store" / "shards").glob("*.safetensors"):
        shard.unlink()
    build_index(DOCS, compressor, persist_dir=tmp_path, embed_model=embed_model)
    _, reopened, _ = load_index(tmp_path, compressor, embed_model=embed_model)
    assert reopened.ids() == ids and all(reopened.get(i).shape[0] for i in ids)


def test_concurrent_writer_is_refused_at_once(compressor, embed_model, tmp_path):
    with exclusive_lock(tmp_path):
        with pytest.raises(StoreLockedError, match=r"is locked by a compression already writing into it \(pid \d+\)"):
            build_index(DOCS[:1], compressor, persist_dir=tmp_path, embed_model=embed_model)
    build_index(DOCS[:1], compressor, persist_dir=tmp_path, embed_model=embed_model)  # released: works


def test_read_only_persist_dir_fails_before_compressing(compressor, embed_model, tmp_path):
    import os

    target = tmp_path / "ro"
    target.mkdir()
    os.chmod(target, 0o555)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(PersistDirError, match="Nothing was compressed"):
            build_index(DOCS[:1], compressor, persist_dir=target, embed_model=embed_model)
    finally:
        os.chmod(target, 0o755)


def test_damaged_docstore_is_reported_with_the_repair(compressor, embed_model, tmp_path):
    build_index(DOCS[:1], compressor, persist_dir=tmp_path, embed_model=embed_model)
    path = tmp_path / "docstore.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(CorruptStoreError, match="delete those three files and compress all the documents again"):
        load_index(tmp_path, compressor, embed_model=embed_model)
    with pytest.raises(CorruptStoreError, match="stored chunks are not recomputed"):
        build_index(DOCS[:1], compressor, persist_dir=tmp_path, embed_model=embed_model)


def test_read_documents_skips_bad_files_by_name(tmp_path):
    (tmp_path / "good.txt").write_text("A lighthouse guides ships.")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x01binary")
    with pytest.warns(UserWarning) as record:
        docs = read_documents(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert [d.metadata["file_name"] for d in docs] == ["good.txt"] and docs[0].doc_id == str(tmp_path / "good.txt")
    assert "empty.txt" in messages and "latin1.txt" in messages and "not valid UTF-8" in messages
    assert "blob.bin" in messages and "binary" in messages


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_compress_checks_the_input_directory_before_loading_models(tmp_path, capsys, setup):
    directory = tmp_path / "docs"
    if setup == "empty":
        directory.mkdir()
    assert main(["compress", str(directory), "--persist-dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert ("does not exist" if setup == "missing" else "No documents to compress") in err


@pytest.mark.parametrize("argv, expected", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--top-k", "-1"], "--top-k must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_query_options_are_checked(tmp_path, capsys, argv, expected):
    assert main(["query", str(tmp_path), "what?", *argv]) == 2
    assert expected in capsys.readouterr().err


def test_query_empty_question_and_missing_dir(tmp_path, capsys):
    assert main(["query", str(tmp_path), "  "]) == 2
    assert "question is empty" in capsys.readouterr().err
    assert main(["query", str(tmp_path / "nope"), "what?"]) == 2
    err = capsys.readouterr().err
    assert "No persist dir" in err and "compressor=" not in err


def test_finetune_options_are_checked_before_loading(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    assert main(["finetune", str(tmp_path), str(data), "--epochs", "0"]) == 2
    assert "epochs must be >= 1" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path), str(data), "--checkpoint-every", "0"]) == 2
    assert "checkpoint_every must be >= 1" in capsys.readouterr().err
    # tmp_path holds no index: an error about the budget, not the persist dir, shows it was checked first.
    assert main(["finetune", str(tmp_path), str(data), "--position-budget", "0"]) == 2
    assert "--position-budget must be at least 1 (got 0)" in capsys.readouterr().err


def test_query_with_zero_max_new_tokens_is_refused_before_loading(tmp_path, capsys):
    assert main(["query", str(tmp_path), "what?", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1 (got 0)" in capsys.readouterr().err


def test_ctrl_c_in_a_command_is_a_clean_message(monkeypatch, capsys, tmp_path):
    import lloco_index.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_compress", interrupted)
    assert cli.main(["compress", str(tmp_path), "--persist-dir", str(tmp_path / "p")]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
