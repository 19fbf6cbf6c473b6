"""An answer length of zero is refused, per call too (it used to mean the default, or an empty answer)."""

from __future__ import annotations

import pytest
from lloco_index.errors import ContextBudgetError
from lloco_index.generation import SoftPromptReader


@pytest.mark.parametrize("default, per_call", [(0, None), (8, 0), (8, -3)])
def test_zero_answer_length_is_refused(backbone, default, per_call):
    reader = SoftPromptReader(backbone, None, max_new_tokens=default)
    with pytest.raises(ContextBudgetError, match="max_new_tokens must be a whole number of at least 1"):
        reader.generate([{"role": "user", "content": "Hello"}], adapter=None, max_new_tokens=per_call)
