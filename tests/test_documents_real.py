"""A document of 50,000 words, indexed whole, is found by a question about its last paragraph (real weights)."""
from __future__ import annotations

import pydoc_data.topics
import pytest

from allmpnet.search import Index

LAST_PARAGRAPH = ("Appendix C. Care of the printed edition. The printed copies of this reference are kept in the "
                  "basement reading room, where the humidity is held at forty percent and the lights go off at six "
                  "in the evening. Readers may borrow a copy for two weeks by signing the blue ledger beside the "
                  "door.")
QUESTION = "For how long may I borrow a printed copy, and where do I sign for it?"


def python_reference(min_words: int) -> str:
    """Sections of the Python language reference that ships with Python (pydoc's topics), to min_words words."""
    sections, words = [], 0
    for name in sorted(pydoc_data.topics.topics):
        sections.append(pydoc_data.topics.topics[name].strip())
        words += len(sections[-1].split())
        if words >= min_words:
            return "\n\n".join(sections)
    raise AssertionError(f"the reference has only {words} words")


@pytest.mark.real_weights
def test_fifty_thousand_word_document_found_by_its_last_paragraph(tmp_path, real_encoder):
    document = python_reference(50_000) + "\n\n" + LAST_PARAGRAPH
    assert len(document.split()) >= 50_000
    others = [pydoc_data.topics.topics[name] for name in ("if", "while", "import", "with", "try")]
    encoder = real_encoder.with_precision("auto")  # the fastest exact-enough path this machine has
    index = Index.build(tmp_path / "ix", texts=[document] + others, ids=["reference", "if", "while", "import",
                                                                         "with", "try"], encoder=encoder,
                        chunking=True)
    assert index.record_count == 6 and len(index) > 250  # the long document is hundreds of chunks, none cut
    hits = index.search(QUESTION, k=3)
    top = hits[0]
    assert top.id == "reference"
    paragraph_start = document.index(LAST_PARAGRAPH)
    assert top.span[1] == len(document) and top.span[0] >= paragraph_start - 2000
    assert "blue ledger" in top.text and top.text == document[top.span[0]:top.span[1]]
    assert index.document_text(top.row) == document
    assert len({h.id for h in hits}) == 3
