"""The LLMLingua text-compression peer, run as a subprocess in its own virtual environment.

llmlingua 0.2.2 needs transformers 4.x; this package runs on 5.x. The harness therefore starts
``llmlingua_worker.py`` with the Python of a separate environment (made by
``benchmarks/setup_llmlingua_env.sh``) and gives it the default decoder's weights as a plain
safetensors directory that transformers 4.47 can read. When that environment is missing the peer is
skipped, and the reason is recorded in the results.

>>> peer = LLMLinguaPeer.start()            # raises PeerUnavailable with the reason
>>> out = peer.compress(["chunk 1", "chunk 2"], question="Who?", rate=0.125)
>>> out["compressed_prompt"], out["compress_s"]
>>> peer.close()
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Sequence, Union

from .. import defaults

LLMLINGUA_VENV_ENV = "LLMLINGUA_VENV"


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message says why and how to fix it."""


def llmlingua_venv() -> Path:
    """``$LLMLINGUA_VENV`` or ``<cache dir>/llmlingua-venv`` (where the setup script puts it)."""
    env = os.environ.get(LLMLINGUA_VENV_ENV)
    return Path(env).expanduser() if env else defaults.cache_dir() / "llmlingua-venv"


def tiktoken_cache_dir() -> Optional[Path]:
    """llama-index-core ships a tiktoken cache; llmlingua would otherwise download an encoding."""
    spec = importlib.util.find_spec("llama_index.core")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "_static" / "tiktoken_cache"
    return path if path.is_dir() else None


def transformers4_model_dir(source: Union[str, Path], target: Optional[Path] = None) -> Path:
    """A view of a LLaMA safetensors directory that transformers 4.47 loads as a plain LlamaForCausalLM.

    Weights and tokenizer.json are symlinked (no copy); the config gets ``architectures``
    ``["LlamaForCausalLM"]``, no ``quantization_config`` and a top-level ``rope_theta`` (4.x does not
    read 5.x's ``rope_parameters``); the tokenizer config names ``GPT2TokenizerFast``.
    """
    source = Path(source)
    target = target or defaults.cache_dir() / "models" / f"{source.name}-transformers4"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json"):
        link = target / name
        if not link.exists():
            if link.is_symlink():
                link.unlink()
            link.symlink_to((source / name).resolve())
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    rope = config.pop("rope_parameters", None) or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    if "dtype" in config:
        config["torch_dtype"] = config.pop("dtype")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((source / "tokenizer_config.json").read_text()) if (source / "tokenizer_config.json").is_file() else {}
    tok = {k: v for k, v in tok.items() if k not in ("backend", "is_local", "local_files_only")}
    tok["tokenizer_class"] = "GPT2TokenizerFast"
    tok["model_max_length"] = int(config.get("max_position_embeddings", 8192))
    (target / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    if (source / "chat_template.jinja").is_file() and not (target / "chat_template.jinja").exists():
        shutil.copy(source / "chat_template.jinja", target / "chat_template.jinja")
    return target


class LLMLinguaPeer:
    """A running llmlingua worker process (model loaded once, one request per query)."""

    def __init__(self, process: subprocess.Popen, info: dict, model_dir: Path):
        self.process = process
        self.info = info
        self.model_dir = model_dir

    @classmethod
    def start(cls, model_dir: Optional[Union[str, Path]] = None, *, venv: Optional[Path] = None,
              device: str = "cpu", timeout_s: float = 600.0) -> "LLMLinguaPeer":
        """Start the worker; raise :class:`PeerUnavailable` with the reason when it cannot run."""
        venv = venv or llmlingua_venv()
        python = venv / "bin" / "python"
        if not python.is_file():
            raise PeerUnavailable(
                f"no llmlingua environment at {venv} (run `bash benchmarks/setup_llmlingua_env.sh` or set "
                f"${LLMLINGUA_VENV_ENV})"
            )
        if model_dir is None:
            from ..models import default_decoder_dir

            model_dir = transformers4_model_dir(default_decoder_dir())
        env = dict(os.environ)
        cache = tiktoken_cache_dir()
        if cache is not None:
            env["TIKTOKEN_CACHE_DIR"] = str(cache)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        worker = Path(__file__).with_name("llmlingua_worker.py")
        process = subprocess.Popen(
            [str(python), str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env,
        )
        process.stdin.write(json.dumps({"model_dir": str(model_dir), "device": device}) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            process.kill()
            raise PeerUnavailable(f"the llmlingua worker in {venv} exited while loading (exit {process.wait()})")
        info = json.loads(line)
        if not info.get("ready"):
            process.kill()
            raise PeerUnavailable(f"the llmlingua worker could not load {model_dir}: {info.get('error')}")
        return cls(process, info, Path(model_dir))

    def compress(self, context: Sequence[str], *, question: str, rate: float) -> dict:
        """Question-aware compression of the context chunks to ``rate`` of their tokens."""
        self.process.stdin.write(json.dumps({"context": list(context), "question": question, "rate": rate}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise PeerUnavailable(f"the llmlingua worker died (exit {self.process.poll()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"llmlingua failed: {out['error']}")
        return out

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> "LLMLinguaPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
