"""LangChain adapter: ``ChatLLoCO`` (BaseChatModel) and ``LLoCOLangChainRetriever`` (BaseRetriever).

The retriever returns Documents whose ``page_content`` is a soft-prompt
placeholder; the chat model splices the soft prompt in where the placeholder
lands in the prompt. Both drop into the standard LCEL RAG chain unchanged::

    retriever = LLoCOLangChainRetriever.from_texts(texts, compressor, persist_dir="./storage")
    llm = ChatLLoCO.from_retriever(retriever)
    chain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
             | prompt | llm | StrOutputParser())
"""

from .chat_model import ChatLLoCO
from .retriever import LLoCOLangChainRetriever
from .search import ChunkIndex, ChunkRecord, Embedder, select_chunks

__all__ = ["ChatLLoCO", "ChunkIndex", "ChunkRecord", "Embedder", "LLoCOLangChainRetriever", "select_chunks"]
