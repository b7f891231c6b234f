"""Text conditioning as sd-scripts computes it, in 75-token chunks. SDXL: penultimate hidden states of both
encoders without the final layer norm, and TE2's pooled vector at the first EOS through `text_projection`.
SD 1.x/2.x: the one encoder's last layer through its final norm, or with --clip_skip N the N-th from the end.

A caption of up to `max_token_length` tokens (75, 150 or 225) is tokenised to BOS + tokens + EOS + padding
(77, 152 or 227 ids) and cut into n chunks of 77 ids: BOS + 75 ids + the sequence's last id. Each chunk is
encoded on its own; the states are re-assembled to BOS + n*75 + last, i.e. 77, 152 or 227 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import LongTensor, Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lorakit.errors import LorakitError
from lorakit.models.text_encoders import EOS_TOKEN_ID
from lorakit.models.tokenizers import MODEL_MAX_LENGTH

_CHUNK = MODEL_MAX_LENGTH - 2  # ids between BOS and the closing id of each chunk
_MAX_TOKEN_LENGTHS = (75, 150, 225)


def sequence_length(max_token_length: int | None) -> int:
    """Ids per caption for `--max_token_length` (None = 75): 77, 152 or 227."""
    if max_token_length is None:
        return MODEL_MAX_LENGTH
    if max_token_length not in _MAX_TOKEN_LENGTHS:
        raise LorakitError(f"--max_token_length is {max_token_length}; expected 75, 150 or 225 (or unset for 75)")
    return max_token_length + 2


def split_chunks(ids: LongTensor, eos_token_id: int, pad_token_id: int) -> LongTensor:
    """[B, n*75 + 2] ids -> [B, n, 77] chunks of BOS + 75 ids + the sequence's last id.

    When padding is not EOS (OpenCLIP), a chunk whose 76th id is content gets EOS as its last id, and a chunk
    holding only padding becomes BOS, EOS, PAD... (sd-scripts' fix-ups, so every chunk has an EOS).
    """
    batch, length = ids.shape
    if (length - 2) % _CHUNK:
        raise ValueError(f"token sequences of length {length} do not split into chunks of {_CHUNK} + 2")
    chunks = (length - 2) // _CHUNK
    middle = ids[:, 1:-1].reshape(batch, chunks, _CHUNK)
    first = ids[:, None, :1].expand(batch, chunks, 1)
    last = ids[:, None, -1:].expand(batch, chunks, 1)
    result = torch.cat([first, middle, last], dim=2)
    if pad_token_id != eos_token_id:
        closing_content = (result[..., -2] != eos_token_id) & (result[..., -2] != pad_token_id)
        result[..., -1][closing_content] = eos_token_id
        result[..., 1][result[..., 1] == pad_token_id] = eos_token_id
    return result


def tokenize(tokenizer: CLIPTokenizer, texts: Sequence[str], max_token_length: int | None) -> LongTensor:
    """Captions -> [B, n_chunks, 77] ids (n = 1, 2, 3 for max_token_length None/75, 150, 225); longer captions
    are truncated."""
    ids = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=sequence_length(max_token_length),
        return_tensors="pt",
    ).input_ids
    return split_chunks(ids, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _merge_chunks(states: Tensor, batch: int, weights: Tensor | None) -> Tensor:
    """[B*n, 77, w] chunk states (times per-token weights [B, n, 77]) -> [B, n*75 + 2, w]."""
    if weights is not None:
        states = states * weights.reshape(*states.shape[:2], 1).to(states)
    states = states.reshape(batch, -1, *states.shape[1:])
    middle = states[:, :, 1:-1].reshape(batch, -1, states.shape[-1])
    return torch.cat([states[:, 0, :1], middle, states[:, -1, -1:]], dim=1)


def encode_tokens(
    text_encoder1: CLIPTextModel,
    text_encoder2: CLIPTextModelWithProjection,
    tokens1: LongTensor,
    tokens2: LongTensor,
    weights1: Tensor | None = None,
    weights2: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """[B, n, 77] ids of both tokenizers -> (context [B, n*75 + 2, w1 + w2], pooled [B, projection_dim]).

    Optional per-token weights [B, n, 77] (weighted captions) multiply each encoder's hidden states; the pooled
    vector stays unweighted, and nothing is re-normalised. Weights at a chunk's BOS/closing position only matter
    for the first BOS and the last closing state (sd-scripts leaves those unweighted; they are 1 in practice).
    """
    batch = tokens1.shape[0]
    ids1 = tokens1.reshape(-1, tokens1.shape[-1]).to(text_encoder1.device)
    ids2 = tokens2.reshape(-1, tokens2.shape[-1]).to(text_encoder2.device)
    states1 = text_encoder1(ids1, output_hidden_states=True).hidden_states[-2]
    output2 = text_encoder2(ids2, output_hidden_states=True)
    states2 = output2.hidden_states[-2]

    # Pooled: final-layer-normed state at the first EOS of the first chunk. EOS is found by id, not by the
    # config's eos_token_id (SDXL's published TE2 config carries the legacy value 2).
    first_eos = (ids2 == EOS_TOKEN_ID).int().argmax(dim=-1)
    rows = torch.arange(ids2.shape[0], device=ids2.device)
    projection = text_encoder2.text_projection
    pooled = projection(output2.last_hidden_state[rows, first_eos].to(projection.weight.dtype))
    pooled = pooled.reshape(batch, -1, pooled.shape[-1])[:, 0]

    context1 = _merge_chunks(states1, batch, weights1)
    context2 = _merge_chunks(states2, batch, weights2).to(context1.device)
    return torch.cat([context1, context2.to(context1.dtype)], dim=-1), pooled


def encode_single(text_encoder: CLIPTextModel, tokens: LongTensor, weights: Tensor | None = None,
                  clip_skip: int | None = None) -> Tensor:
    """[B, n, 77] ids of SD 1.x/2.x's encoder -> context [B, n*75 + 2, w]: the last layer's states through the
    final layer norm, or with `clip_skip` N the N-th layer from the end through it (sd-scripts'
    `get_hidden_states`; N = 1 is the last layer). Optional per-token weights [B, n, 77] multiply the states."""
    batch = tokens.shape[0]
    ids = tokens.reshape(-1, tokens.shape[-1]).to(text_encoder.device)
    if clip_skip is None or clip_skip == 1:
        states = text_encoder(ids).last_hidden_state
    else:
        hidden = text_encoder(ids, output_hidden_states=True).hidden_states
        if clip_skip > len(hidden) - 1:
            raise LorakitError(f"--clip_skip {clip_skip}: the text encoder has only {len(hidden) - 1} layers")
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        states = final_norm(hidden[-clip_skip])
    return _merge_chunks(states, batch, weights)
