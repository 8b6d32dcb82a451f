"""Text generation from a checkpoint: greedy at temperature 0, else seeded sampling."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from iota.checkpoint.local import compose, load_checkpoint


@torch.no_grad()
def generate(
    checkpoint_dir: Path,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """The text the checkpoint writes after `prompt` (the prompt itself not included).

    The context starts with EOS, as every training document after the first follows one; generation stops at
    EOS or after `max_new_tokens`, and sees at most the model's last seq_len tokens. Only the tokenizer's own ids
    are drawn (the embedding rows padded past its vocabulary are never targets).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    checkpoint = load_checkpoint(checkpoint_dir)
    tokenizer = checkpoint.tokenizer()
    model = compose(checkpoint, device)
    seq_len = checkpoint.config.seq_len
    generator = torch.Generator().manual_seed(seed)

    prompt_ids = tokenizer.encode(prompt)
    context = [tokenizer.eos_id, *prompt_ids]
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        window = torch.tensor([context[-seq_len:]], dtype=torch.long, device=device)  # (1, T)
        logits = model(window)[0, -1, : tokenizer.vocab_size].float().cpu()  # (V,)
        if temperature == 0:
            next_id = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = int(torch.multinomial(probs, 1, generator=generator))
        if next_id == tokenizer.eos_id:
            break
        context.append(next_id)
        new_ids.append(next_id)
    return continuation(tokenizer.decode, prompt_ids, new_ids)


def continuation(decode: Callable[[list[int]], str], prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt, without U+FFFD.

    A byte-level tokenizer's token may hold part of a character's UTF-8 bytes: decoding prompt and continuation
    as one sequence keeps a character split across the boundary whole, and what still decodes to U+FFFD (a
    character cut off by the last token, or bytes a small model strung together that are no UTF-8) is no text
    the model wrote, so it is dropped rather than printed as replacement characters."""
    prefix = decode(prompt_ids)
    return decode(prompt_ids + new_ids)[len(prefix) :].replace("\ufffd", "")
