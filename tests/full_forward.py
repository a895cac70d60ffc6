"""An independent reference for the harness's log-probs: a full forward of each
prompt + answer sequence, right-padded, log-softmax over the whole vocabulary. The
harness computes them with a prompt shared by both answers of a pair
(``harness.train.pair_logps``); tests check it, trl and vLLM against this."""

from __future__ import annotations

from typing import Sequence

import torch

from harness.engines.generate import completion_ids


@torch.inference_mode()
def sequence_logprobs(model, tokenizer, prompts: Sequence[Sequence[dict]], responses: Sequence[str],
                      batch_size: int = 16, max_length: int = 1024) -> list[float]:
    """Sum of log p(completion tokens | prompt) per (prompt, response), tokenized as trl does."""
    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    for i in range(0, len(responses), batch_size):
        ids, masks = [], []
        for msgs, resp in zip(prompts[i:i + batch_size], responses[i:i + batch_size]):
            p, c = completion_ids(tokenizer, msgs, resp)
            seq = (p + c)[:max_length]
            ids.append(seq)
            masks.append(([0] * len(p) + [1] * len(c))[:max_length])
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        # right padding: positions stay 0..len-1 without relying on position_ids support
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=device)
        attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=device)
        target = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
        logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        out.extend((logp * target[:, 1:]).sum(-1).tolist())
    model.train(was_training)
    return out
