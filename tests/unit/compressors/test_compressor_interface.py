"""BaseCompressor declares what the reader, the manifest and the trainers read from a compressor."""

from __future__ import annotations

from lloco_index.compressors import Compressor, ICAECompressor, TokenEmbeddingCompressor
from lloco_index.compressors.base import BaseCompressor
from lloco_index.generation import SoftPromptReader


class PlainCompressor(TokenEmbeddingCompressor):
    prompt_format = "plain"


def test_declared_defaults(backbone):
    compressor = TokenEmbeddingCompressor(backbone)
    assert (compressor.prompt_format, compressor.reader_adapter, compressor.source_dir) == ("chat", None, None)
    assert isinstance(compressor, Compressor)
    for name in ("prompt_format", "reader_adapter", "source_dir"):
        assert name in vars(BaseCompressor), name


def test_loaded_compressor_records_its_directory(backbone, tmp_path):
    from lloco_index.compressors import load_compressor

    ICAECompressor(backbone).save_pretrained(tmp_path / "c")
    loaded = load_compressor(tmp_path / "c", backbone=backbone)
    assert loaded.source_dir == (tmp_path / "c").resolve()


def test_reader_follows_the_declared_prompt_format(backbone):
    messages = [{"role": "user", "content": "Where is the lighthouse?"}]
    plain = SoftPromptReader(backbone, compressor=PlainCompressor(backbone)).render(messages)
    assert plain == "Where is the lighthouse?"  # no template, no BOS
    chat = SoftPromptReader(backbone, compressor=TokenEmbeddingCompressor(backbone)).render(messages)
    assert chat != plain and "Where is the lighthouse?" in chat
    assert SoftPromptReader(backbone).render(messages) == chat  # no compressor: the chat layout
    assert SoftPromptReader(backbone, compressor=PlainCompressor(backbone)).resolve_adapter() is None
