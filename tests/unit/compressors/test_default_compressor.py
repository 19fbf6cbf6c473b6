"""One factory for "the shipped compressor, or the identity fallback", used by every entry point."""

from __future__ import annotations

import pytest

from lloco_index import compressors, defaults
from lloco_index.compressors import TokenEmbeddingCompressor, default_compressor


@pytest.fixture
def no_shipped_compressor(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "default_compressor_dir", lambda: tmp_path / "not-shipped")


def test_shipped_compressor_loads_without_notice(backbone, monkeypatch):
    from lloco_index.compressors import loading

    # Stands in for the shipped compressor: loading the real one would add its adapters to the
    # process-wide SmolLM2 that other tests read as the plain model.
    shipped = TokenEmbeddingCompressor(backbone)
    asked = []
    monkeypatch.setattr(loading, "load_compressor", lambda directory=None, **kw: asked.append((directory, kw)) or shipped)
    assert default_compressor(backbone) == (shipped, None)
    assert asked == [(None, {"backbone": backbone})]  # the shipped directory, on the caller's decoder


def test_fallback_is_the_identity_compressor_with_a_notice(backbone, no_shipped_compressor):
    compressor, notice = default_compressor(backbone)
    assert isinstance(compressor, TokenEmbeddingCompressor) and compressor.backbone is backbone
    assert "not-shipped" in notice and "TokenEmbeddingCompressor on tiny-test" in notice
    [prompt] = compressor.compress(["one two three"])
    ids = backbone.tokenize("one two three")
    assert prompt.shape[0] == len(ids)  # the identity: one position per token


def test_every_entry_point_uses_the_factory(backbone, monkeypatch):
    from lloco_index.eval.runner import resolve_compressors
    from lloco_index.finetune import benchmark

    calls = []
    identity = TokenEmbeddingCompressor(backbone)

    def factory(b=None):
        calls.append(b)
        return identity, "NOTICE: test fallback"

    monkeypatch.setattr(compressors, "default_compressor", factory)
    assert benchmark._compressor(backbone) == (identity, "token_embedding (the shipped compressor is not available)")
    [entry] = resolve_compressors(["default"], backbone)
    assert entry.compressor is identity and entry.note == "NOTICE: test fallback"
    # With the identity reference asked for too, the fallback is not run twice.
    assert [e.label for e in resolve_compressors(["default", "token_embedding"], backbone)] == ["token_embedding"]
    assert calls == [backbone, backbone, backbone]


def test_chat_model_default_warns_with_the_factory_notice(backbone, monkeypatch):
    pytest.importorskip("langchain_core")
    from lloco_index.langchain import ChatLLoCO

    identity = TokenEmbeddingCompressor(backbone)
    monkeypatch.setattr(compressors, "default_compressor", lambda b=None: (identity, "NOTICE: test fallback"))
    with pytest.warns(UserWarning, match="NOTICE: test fallback"):
        chat = ChatLLoCO.default()
    assert chat.compressor is identity


def test_demo_uses_the_factory(monkeypatch):
    from lloco_index import demo

    class Stop(Exception):
        pass

    def factory(b=None):
        raise Stop

    monkeypatch.setattr(compressors, "default_compressor", factory)
    with pytest.raises(Stop):
        demo.run_demo(out=lambda *_: None)
    assert not hasattr(demo, "default_or_untrained_compressor")
