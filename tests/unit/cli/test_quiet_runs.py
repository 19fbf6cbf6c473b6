"""A run says what it needs to and nothing else: no peft warnings about paths or adapters the user never chose,
and Ctrl-C during `compress` or `finetune` ends with one line saying what is saved and how to go on."""

from __future__ import annotations

import re
import warnings

import pytest

from helpers import FINETUNE_DOCS as DOCS, FINETUNE_QA as QA, FINETUNE_SEGMENT as SEGMENT
from helpers import fast_finetune_config as fast_config, finetune_backbone as tiny_backbone


pytestmark = pytest.mark.usefixtures("one_thread")


def _reader_compressor(backbone, base_path: str):
    """A tiny ICAE compressor with a trained-looking reader adapter saved on another machine (``base_path``)."""
    from peft import LoraConfig

    from lloco_index.compressors import ICAECompressor, ICAEConfig

    compressor = ICAECompressor(backbone, ICAEConfig(n_slots=4, segment_length=SEGMENT, pooling="mean", lora_r=4,
                                                     lora_alpha=8))
    backbone.add_adapter("lloco_reader", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    backbone.peft_model.peft_config["lloco_reader"].base_model_name_or_path = base_path
    return compressor


def test_no_peft_warnings_about_the_base_model_path_or_deleted_adapters(tmp_path, monkeypatch):
    """A shipped adapter records the path of the machine it was trained on; reading, copying, checkpointing and
    saving adapters must not send peft looking for a config.json there, and replacing an adapter in the same
    process must not warn that it "was active"."""
    from lloco_index.finetune import LoRAFinetuner
    from lloco_index.finetune.data import TrainExample
    from lloco_index.generation import SoftPromptReader
    from lloco_index.generation import make_placeholder
    from lloco_index.store import SoftPromptStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network either way; peft's check then gives up and warns
    backbone = tiny_backbone()
    compressor = _reader_compressor(backbone, str(tmp_path / "elsewhere" / "models" / "SmolLM2-135M-Instruct"))
    store = SoftPromptStore.for_compressor(compressor)
    [pid] = store.add([DOCS[0].text], compressor)
    example = TrainExample([{"role": "user", "content": f"Context: {make_placeholder(pid)}\nWho kept the lighthouse?"}],
                           "Ada Quill", id="q0")
    reader = SoftPromptReader(backbone, store, compressor=compressor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for run in ("a", "b"):  # the second run replaces the first run's adapter of the same name
            LoRAFinetuner(reader, [example], adapter_name="domain", output_dir=tmp_path / run,
                          config=fast_config(epochs=2, checkpoint_every=1), progress=False).train()
        compressor.save_pretrained(tmp_path / "saved")
        backbone.delete_adapter("domain")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "Could not find a config file" in m], messages
    assert not [m for m in messages if "was active which is now deleted" in m], messages


def _tiny_dirs(tmp_path):
    from lloco_index.backbone import Backbone
    from lloco_index.compressors import TokenEmbeddingCompressor
    from lloco_index.compressors.token_embedding import TokenEmbeddingConfig

    model_dir, comp_dir, docs = tmp_path / "model", tmp_path / "comp", tmp_path / "docs"
    saved = tiny_backbone()
    saved.base_model.save_pretrained(str(model_dir))
    saved.tokenizer.save_pretrained(str(model_dir))
    backbone = Backbone.load(model_dir)
    TokenEmbeddingCompressor(backbone, TokenEmbeddingConfig(segment_length=SEGMENT, base_model=backbone.identity)
                             ).save_pretrained(comp_dir)
    docs.mkdir()
    for i, doc in enumerate(DOCS):
        (docs / f"doc{i}.txt").write_text(doc.text * 4)
    return model_dir, comp_dir, docs


def _interrupt_after(monkeypatch, cls, method: str, calls: int) -> None:
    """Ctrl-C arriving in the ``calls + 1``-th call of ``cls.method``."""
    original = getattr(cls, method)
    count = {"n": 0}

    def wrapped(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


def _last_line(err: str) -> str:
    lines = [l for l in re.split(r"[\r\n]", err) if l.strip()]
    return lines[-1]


def test_ctrl_c_in_compress_says_what_is_stored(tmp_path, capsys, caplog):
    from lloco_index import defaults
    from lloco_index.cli import main
    from lloco_index.compressors import TokenEmbeddingCompressor

    model_dir, comp_dir, docs = _tiny_dirs(tmp_path)
    storage = tmp_path / "storage"
    argv = ["compress", str(docs), "--persist-dir", str(storage), "--compressor", str(comp_dir), "--decoder", str(model_dir)]
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, TokenEmbeddingCompressor, "compress", 1)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = _last_line(err)
    n = defaults.DEFAULT_COMPRESS_BATCH_SIZE  # the first batch was finished and flushed
    assert line == (f"interrupted: {n} new chunks compressed and stored in {storage} ({n} in all), the index not "
                    f"written yet; run the same command again to go on (stored chunks are not compressed again).")
    assert "interrupted:" not in caplog.text  # the store's own note is not repeated beside the line
    assert main(argv) == 0
    assert f", {n} already stored and not recompressed" in capsys.readouterr().out


def test_ctrl_c_in_finetune_says_which_checkpoint_is_saved(tmp_path, capsys, qa_file):
    from lloco_index.cli import main
    from lloco_index.finetune import LoRAFinetuner

    from helpers import cli_storage

    storage, _ = cli_storage(tmp_path)
    out = tmp_path / "adapter"
    argv = ["finetune", str(storage), str(qa_file), "--output-dir", str(out), "--epochs", "1", "--grad-accum", "2",
            "--val-fraction", "0", "--checkpoint-every", "1", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, LoRAFinetuner, "_loss_sum", 2)  # step 1 (2 micro-batches) finishes, step 2 is cut
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert _last_line(err) == (
        f"interrupted: the checkpoint of step 1 is saved in {out / 'training' / 'checkpoints'}; run the same command "
        f"again to resume from it (from Python: LLoCOFinetuneEngine.resume('{out}').finetune()).")
    assert main(argv) == 0
    assert '"finished": true' in capsys.readouterr().out


@pytest.fixture
def qa_file(tmp_path):
    import json

    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in QA) + "\n")
    return path
