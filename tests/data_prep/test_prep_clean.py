from pathlib import Path

import numpy as np
import pytest

from data_prep.clean import clean_batch, first_occurrences, normalize_text
from data_prep.errors import DataError
from data_prep.readers import Source

SRC = Source(Path("rows.jsonl"), "json")
PR_COLUMNS = {"prompt": ("data.prompt_column", "q"), "response": ("data.response_column", "a")}


def test_normalize_text_nfkc_and_whitespace():
    assert normalize_text("  ｆｕｌｌ\u00a0width \r\nline  \n\n\n\nnext\t ") == "full width\nline\n\nnext"
    assert normalize_text("def f():\n    return 1") == "def f():\n    return 1", "indentation is kept"


def test_clean_batch_drops_empty_and_hashes_normalised_content():
    batch = {"q": ["What?", "What? ", None, "Why"], "a": ["A", "A", "B", "  "]}
    out = clean_batch(batch, [0, 1, 2, 3], kind="prompt_response", columns=PR_COLUMNS, src=SRC, src_id=0)
    assert out["prompt"][1] == "What?"
    assert out["_drop"] == ["", "", "empty_field", "empty_field"]
    assert out["_hash"][0] == out["_hash"][1], "same content after normalisation -> same hash"
    assert out["_hash"][0] != out["_hash"][2]
    assert out["_phash"][0] == out["_phash"][1] and out["_row"] == [0, 1, 2, 3]


def test_number_where_text_expected_names_the_row():
    with pytest.raises(DataError, match=r"rows.jsonl: line 2: data.prompt_column 'q' holds a int"):
        clean_batch({"q": ["ok", 42], "a": ["x", "y"]}, [0, 1], kind="prompt_response", columns=PR_COLUMNS,
                    src=SRC, src_id=0)


@pytest.mark.parametrize("value", ["just text", [{"role": "user"}], ["hi", "there"], [{"role": 1, "content": "x"}]])
def test_malformed_messages_are_refused(value):
    cols = {"messages": ("data.messages_column", "messages")}
    with pytest.raises(DataError, match="line 1: .*role"):
        clean_batch({"messages": [value]}, [0], kind="messages", columns=cols, src=SRC, src_id=0)


def test_messages_prompt_hash_and_empty_turn():
    cols = {"messages": ("data.messages_column", "m")}
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    empty_turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]
    out = clean_batch({"m": [conv, other, empty_turn]}, [0, 1, 2], kind="messages", columns=cols, src=SRC, src_id=0)
    assert out["_phash"][0] == out["_phash"][1] and out["_hash"][0] != out["_hash"][1]
    assert out["_drop"] == ["", "", "empty_field"]


def test_first_occurrences_keeps_first_of_each():
    mask = first_occurrences(np.array([5, 3, 5, 7, 3]))
    assert mask.tolist() == [True, True, False, True, False]
