"""Answers that never ended train without an end-of-turn.

A sample cut at ``generation.max_new_tokens`` stopped mid-answer. trl renders every
conversational answer through the chat template, which closes the assistant turn
(``<|im_end|>`` and the like): trained so, a cut chosen answer would teach the model to
stop mid-sentence, and a cut rejected one to avoid stopping there. A pair marks such a
side (``chosen_cut`` / ``rejected_cut`` True, ``harness.methods.base.pair``); its tokens
are then the template's rendering with the answer left open (``continue_final_message``):
the prompt, the assistant header and the answer's text, nothing after it. A side that
does not say (a human answer, a pair of an older run) is trained as ended.

``answer_ids`` is that tokenization for our own forwards (fitting, the probe);
``open_rows`` makes trl's tokenized rows the same. Not here: fitting lengths
(``harness.train.truncate``), training (``harness.train.dpo``).
"""

from __future__ import annotations

from typing import Sequence

from harness.engines.generate import chat_ids, completion_ids
from harness.train.trainer import TrainingError


def ends_turn(item: dict, key: str) -> bool:
    """Whether ``item``'s answer ``key`` trains with the template's end-of-turn: all but a
    side marked cut (``<key>_cut`` is True)."""
    return item.get(f"{key}_cut") is not True


def answer_ids(tokenizer, messages: Sequence[dict], item: dict, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of ``item[key]`` after ``messages`` as training tokenizes
    it (``completion_ids``, without the end-of-turn for a cut answer)."""
    return completion_ids(tokenizer, messages, item[key], end_turn=ends_turn(item, key))


def open_rows(dataset, tokenizer, items: Sequence[dict], keys: Sequence[str] = ("chosen", "rejected")):
    """trl's tokenized rows (a "row" column naming each row's item in ``items``) with each cut
    answer's ids (``<key>_ids``) replaced by its open rendering after the row's prompt ids, so
    no cut answer ends with an end-of-turn. Rows of whole answers are left as trl made them.
    Raises TrainingError when the open rendering does not start with trl's prompt ids (a chat
    template that renders the prompt differently when the answer is left open)."""
    if not any(not ends_turn(it, k) for it in items for k in keys):
        return dataset

    def reopen(row):
        item = items[row["row"]]
        out = {f"{k}_ids": row[f"{k}_ids"] for k in keys}
        for k in keys:
            if ends_turn(item, k):
                continue
            full = chat_ids(tokenizer, list(item["messages"]) + [{"role": "assistant", "content": item[k]}], False,
                            continue_final_message=True)
            n = len(row["prompt_ids"])
            if full[:n] != row["prompt_ids"]:
                raise TrainingError(f"pair {item.get('id', row['row'])!r}: the chat template renders the prompt of "
                                    f"its cut {k} answer (left open, without an end-of-turn) differently from trl's")
            out[f"{k}_ids"] = full[n:]
        return out

    return dataset.map(reopen)
