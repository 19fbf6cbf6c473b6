"""The quick-start demo: compress the shipped sample corpus and answer questions over it.

Prints, per question, the answer, the reference, the positions the decoder
read (soft prompts + prompt text) against the positions of reading the whole
document, and where the time went.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Optional

from . import defaults

SAMPLE_CORPUS = Path(__file__).parent / "sample_corpus"


def load_sample_corpus():
    """The shipped CC0 documents as LlamaIndex Documents, and their questions."""
    from llama_index.core import Document

    docs = [Document(text=p.read_text(encoding="utf-8"), metadata={"file_name": p.name}, id_=p.name)
            for p in sorted(SAMPLE_CORPUS.glob("*.txt")) if p.name != "LICENSE.txt"]
    questions = [json.loads(line) for line in (SAMPLE_CORPUS / "questions.jsonl").read_text().splitlines() if line.strip()]
    return docs, questions


def run_demo(persist_dir: Optional[Path] = None, *, max_questions: int = 6, top_k: int = 3, compare_full: bool = True,
             expand_top_k: int = defaults.DEFAULT_EXPAND_TOP_K, compressor=None, out=print) -> list[dict]:
    """Run the demo and return one record per question."""
    from .llamaindex import LLoCOLLM, LLoCOQueryEngine, build_index, load_index

    persist_dir = Path(persist_dir or defaults.cache_dir() / "demo-storage")
    notice = None
    if compressor is None:
        from .compressors import default_compressor

        compressor, notice = default_compressor()
    if notice:
        out(notice)
    quality = _quality_line(compressor)
    out(f"compressor: {compressor.config.mode} {compressor.fingerprint} ({compressor.n_slots} slots per "
        f"{compressor.segment_length} tokens) on {compressor.backbone.identity}" + (f"\n{quality}" if quality else ""))
    from .precision import describe

    out(describe(compressor.backbone.device))

    docs, questions = load_sample_corpus()
    start = time.perf_counter()
    manifest_ok = (persist_dir / "lloco_index.json").is_file()
    if manifest_ok:
        try:
            index, store, compressor = load_index(persist_dir, compressor)
        except Exception as exc:  # e.g. a demo dir from another compressor: rebuild elsewhere, never delete it
            out(f"(existing demo index at {persist_dir} not reusable: {exc})")
            persist_dir = persist_dir.with_name(persist_dir.name + "-" + compressor.fingerprint)
            manifest_ok = False
    if not manifest_ok:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            index, store = build_index(docs, compressor, persist_dir=persist_dir, show_progress=True)
    n_source = sum(len(compressor.backbone.tokenize(d.text)) for d in docs)
    out(f"indexed {len(docs)} documents, {n_source} tokens -> {len(store)} soft prompts, "
        f"{sum(store.num_positions(i) for i in store.ids())} positions in {time.perf_counter() - start:.1f}s "
        f"(persisted at {persist_dir})\n")

    llm = LLoCOLLM(compressor, store, max_new_tokens=32)
    # The default engine expands the best chunk to its text (selective expansion); the pure soft-prompt
    # engine reads every chunk compressed, as the LLoCO paper does.
    engines = {"hybrid": LLoCOQueryEngine.from_index(index, llm, response_mode="compact", similarity_top_k=top_k,
                                                     expand_top_k=expand_top_k),
               "soft": LLoCOQueryEngine.from_index(index, llm, response_mode="compact", similarity_top_k=top_k,
                                                   expand_top_k=0)}
    out(f"hybrid: the best {expand_top_k} of {top_k} retrieved chunks as text, the rest as soft prompts; "
        f"soft: all {top_k} as soft prompts\n")
    doc_text = {d.id_: d.text for d in docs}
    records = []
    for q in questions[:max_questions]:
        record = {"question": q["question"], "reference": q["answers"][0]}
        for name, engine in engines.items():
            t0 = time.perf_counter()
            nodes = engine.retrieve(_bundle(q["question"]))
            t1 = time.perf_counter()
            seen_before = len(_calls(llm))
            response = engine.synthesize(_bundle(q["question"]), nodes)
            t2 = time.perf_counter()
            answer = str(response).strip()
            record[name] = {"answer": answer, "positions": sum(c["positions"] for c in _calls(llm)[seen_before:]),
                            "retrieve_s": t1 - t0, "generate_s": t2 - t1, "right": _contains(answer, q["answers"])}
        if compare_full:
            full = llm.reader.generate([{"role": "user", "content": _full_prompt(doc_text[q["document"]], q["question"])}],
                                       adapter=None)
            record["full"] = {"answer": full.text, "positions": full.prompt.positions, "generate_s": full.total_s,
                              "right": _contains(full.text, q["answers"])}
        records.append(record)
        out(f"Q: {q['question']}   (reference: {record['reference']!r})")
        for name in ("hybrid", "soft", "full"):
            if name in record:
                r = record[name]
                mark = "right" if r["right"] else "wrong"
                out(f"   {name:6s}: {r['answer']!r}  [{mark}; {r['positions']} positions, {r['generate_s']:.2f}s]")
        out("")
    tally = ", ".join(f"{name} {sum(r[name]['right'] for r in records)}/{len(records)}"
                      for name in ("hybrid", "soft", "full") if records and name in records[0])
    out(f"answers containing the reference: {tally}")
    return records


def _contains(answer: str, references) -> bool:
    from .eval.metrics import normalize_answer

    got = normalize_answer(answer)
    return any(normalize_answer(ref) and normalize_answer(ref) in got for ref in references)


def _quality_line(compressor) -> Optional[str]:
    """What the compressor's own held-out evaluation says, so nobody mistakes fluent answers for grounded ones."""
    ev = getattr(compressor, "config", None) and compressor.config.extra.get("eval")
    if not ev or "cont_raw" not in ev:
        return None
    share = (ev["cont_none"] - ev["cont_own"]) / max(ev["cont_none"] - ev["cont_raw"], 1e-9)
    line = (f"measured on held-out text: its soft prompts recover {share:.0%} of the loss gap between no context and "
            f"the full text")
    if "qa_normalised_f1" in ev:
        line += (f"; QA F1 soft {ev['qa_soft_f1']:.3f} vs closed book {ev['qa_closed_f1']:.3f} vs full text "
                 f"{ev['qa_full_f1']:.3f} (normalised {ev['qa_normalised_f1']:.2f})")
        reader = compressor.config.extra.get("reader_eval")
        if reader:  # the reader adapter was retrained after the figures above were taken
            line += (f" (measured with an earlier reader adapter). Its reader, trained on mixed contexts, scores on "
                     f"held-out SQuAD articles F1 {reader['hybrid1_f1']:.3f} with the best of {reader['top_k']} chunks "
                     f"as text, {reader['soft_f1']:.3f} from soft prompts only, against {reader['text_rag_f1']:.3f} "
                     f"for text RAG and {reader['full_document_f1']:.3f} for the whole document with the same adapter")
        elif "qa_full_reader_f1" in ev:
            line += f"; its reader adapter scores {ev['qa_full_reader_f1']:.3f} when given the full text instead"
        if min(ev["qa_normalised_f1"], ev.get("qa_normalised_f1_reader", 1.0)) < 0.5:
            line += ". Soft prompts alone are only partly grounded in the documents: see the model card."
    return line


def _bundle(question: str):
    from llama_index.core.schema import QueryBundle

    return QueryBundle(question)


def _calls(llm) -> list[dict]:
    """Positions of every decoder call the LLM made (recorded by wrapping the reader once)."""
    reader = llm.reader
    if not hasattr(reader, "_demo_calls"):
        reader._demo_calls = []
        original = reader.prepare

        def prepare(messages, **kwargs):
            prepared = original(messages, **kwargs)
            reader._demo_calls.append({"positions": prepared.positions})
            return prepared

        reader.prepare = prepare
    return reader._demo_calls


def _full_prompt(document: str, question: str) -> str:
    # LlamaIndex's default QA template, with the document text as the context.
    return ("Context information is below.\n---------------------\n" + document.strip() +
            "\n---------------------\nGiven the context information and not prior knowledge, answer the query.\n"
            f"Query: {question}\nAnswer: ")
