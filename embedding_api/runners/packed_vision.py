"""Images in a packed forward (Qwen3-VL on a CPU): their rows end to end with the texts', no padding.

An image input is a text prompt whose `<|image_pad|>` tokens stand for the image: the model's vision
encoder turns the image's patches into one embedding per such token, which replaces that token's
embedding, and the first decoder layers each add one more of the encoder's outputs (its "deepstack"
features) at the same places. Positions are three-dimensional (M-RoPE: time, height, width), the
image's tokens laid out on its grid and the tokens after it continuing past it. None of that needs
padding: the packed forward (packed.py) takes an image row as it takes a text row, once the image
embeddings are placed in the packed sequence (`embed`), the deepstack features are added after
their layers (`Visual.add`), and the rows' positions are the ones the model's own `get_rope_index`
gives the whole prompt, each row's prefix columns dropped (`positions`). The vision encoder runs
once per packed forward on all of its images (it packs them itself).

Videos keep the padded forward (a video is long: padding costs little beside it).
"""

from __future__ import annotations

import numpy as np
import torch

from . import prefix as prefix_reuse


def takes(p) -> bool:
    """Whether a packed forward takes this input where images pack: text, or text with images."""
    return p.video_pixel_values is None


class Visual:
    """Where a packed forward's image tokens are (`index`, into the packed sequence) and the vision
    encoder's deepstack features to add there, one (tokens, hidden) tensor per early decoder layer."""

    def __init__(self, index: torch.Tensor, deepstack: list[torch.Tensor]):
        self.index = index
        self.deepstack = deepstack

    def add(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """After decoder layer `layer`: its deepstack features added at the image tokens (as the model's
        own `_deepstack_process`), where it has any."""
        if layer < len(self.deepstack):
            hidden[self.index] = hidden[self.index] + self.deepstack[layer]
        return hidden


def embed(runner, batch, ids: torch.Tensor, hidden: torch.Tensor) -> Visual | None:
    """The batch's images through the vision encoder, their embeddings written into `hidden` (T, hidden)
    in place at the image tokens of the packed `ids` (T,); None where the batch has no image."""
    pixels = [p.pixel_values for p in batch if p.pixel_values is not None]
    if not pixels:
        return None
    grid = torch.tensor([g for p in batch for g in p.image_grid_thw], dtype=torch.long, device=hidden.device)
    out = runner.model.get_image_features(runner._to_device(np.concatenate(pixels)), grid, return_dict=True)
    embeds = torch.cat(out.pooler_output, dim=0).to(hidden.dtype)
    index = (ids == runner.image_pad_id).nonzero()[:, 0]
    if index.shape[0] != embeds.shape[0]:
        raise ValueError(f"{index.shape[0]} image tokens for {embeds.shape[0]} image embeddings")
    hidden[index] = embeds
    return Visual(index, [torch.cat(feature, dim=0).to(hidden.dtype) for feature in out.deepstack_features])


def positions(runner, batch, cuts: list[int], lengths: list[int]) -> torch.Tensor:
    """(3, T) M-RoPE positions of a packed sequence: a text row's own tokens at prefix length + 0, 1,
    2, ... in all three; an image row's as the model's `get_rope_index` places its whole prompt, the
    prefix's columns dropped."""
    device = runner.device
    flat = np.concatenate([np.arange(cut, cut + n) for cut, n in zip(cuts, lengths)])
    out = torch.from_numpy(flat).to(device)[None].repeat(3, 1)
    rows = [i for i, p in enumerate(batch) if p.pixel_values is not None]
    if rows:
        grid = torch.tensor([g for i in rows for g in batch[i].image_grid_thw], dtype=torch.long, device=device)
        width = max(lengths[i] for i in rows)
        placed = prefix_reuse.vision_positions(runner, [batch[i] for i in rows], {"image_grid_thw": grid}, width,
                                               [cuts[i] for i in rows])  # (3, rows, width)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        for j, i in enumerate(rows):
            out[:, starts[i]: starts[i] + lengths[i]] = placed[:, j, : lengths[i]]
    return out
