"""Metadata keys a retrieved chunk carries, the same in LlamaIndex nodes and LangChain documents."""

SOFT_PROMPT_KEY = "lloco_soft_prompt"  # the placeholder "<|lloco:ID|>"
ID_KEY = "lloco_id"  # the soft-prompt id in the store
POSITIONS_KEY = "lloco_positions"  # decoder positions the soft prompt takes
CHUNK_KEY = "lloco_chunk"  # position of the chunk within its document (reading order)
DOC_KEY = "lloco_doc_id"  # the document the chunk came from
FINGERPRINT_KEY = "lloco_fingerprint"  # the compressor that made the soft prompt
TEXT_KEY = "lloco_text"  # the chunk's text (LangChain: page_content holds the placeholder)
SCORE_KEY = "lloco_score"  # the retriever's score
EXPANDED_KEY = "lloco_expanded"  # True: the selection policy put this chunk in as its text
LLOCO_KEYS = (SOFT_PROMPT_KEY, ID_KEY, POSITIONS_KEY, CHUNK_KEY, DOC_KEY, FINGERPRINT_KEY)
