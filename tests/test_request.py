"""runtime/request.py: a request's page row follows its pages as they grow or are replaced."""

import numpy as np

from runtime.io_struct import EngineRequest
from runtime.request import Req


def test_page_row_follows_growth_and_replacement() -> None:
    req = Req(EngineRequest("r", [1, 2, 3]), callback=print, max_new_tokens=4, seed=0, eos_ids=frozenset())
    assert req.page_row().tolist() == []
    req.pages.extend([7, 8])
    first = req.page_row()
    assert first.dtype == np.int32 and first.tolist() == [7, 8]
    assert req.page_row() is first  # unchanged pages: the same array, no conversion
    req.pages.append(9)
    assert req.page_row().tolist() == [7, 8, 9]
    req.pages = [4, 5, 6]  # retracted and admitted again: another list of the same length
    assert req.page_row().tolist() == [4, 5, 6]
