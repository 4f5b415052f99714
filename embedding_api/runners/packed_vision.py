"""Images and videos in a packed forward (Qwen3-VL on a CPU): their rows end to end with the texts'.

An image input is a text prompt whose `<|image_pad|>` tokens stand for the image (a video's,
`<|video_pad|>` tokens, frame after frame between their timestamps): the model's vision encoder turns
the patches into one embedding per such token, which replaces that token's embedding, and the first
decoder layers each add one more of the encoder's outputs (its "deepstack" features) at the same
places. Positions are three-dimensional (M-RoPE: time, height, width), the visual tokens laid out
on their grid and the tokens after them continuing past it. None of that needs padding: the packed
forward (packed.py) takes such a row as it takes a text row, once the visual embeddings are placed
in the packed sequence (`embed`), the deepstack features are added after their layers
(`Visual.add`), and the rows' positions are the ones the model's own `get_rope_index` gives each
whole prompt, the prefix's columns dropped (`positions`). The vision encoder runs once per packed
forward on all of its images, and once on all of its videos (it packs them itself).
"""

from __future__ import annotations

import numpy as np
import torch

from . import prefix as prefix_reuse

# (what the vision encoder takes, its grids, the model's method, the placeholder token's id), per kind
_KINDS = (("pixel_values", "image_grid_thw", "get_image_features", "image_pad_id"),
          ("video_pixel_values", "video_grid_thw", "get_video_features", "video_pad_id"))


def visual(p) -> bool:
    """Whether an input has images or videos."""
    return p.pixel_values is not None or p.video_pixel_values is not None


class Visual:
    """Where a packed forward's image and video tokens are (index tensors into the packed sequence)
    and the vision encoder's deepstack features to add there, one (tokens, hidden) tensor per early
    decoder layer, per kind; and the grids the encoder took (`image_grid_thw`, `video_grid_thw`:
    the batch's, in row order, or None), which place the rows' M-RoPE positions too."""

    def __init__(self, parts: list[tuple[torch.Tensor, list[torch.Tensor]]], grids: dict):
        self.parts = parts
        self.grids = grids

    def add(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """After decoder layer `layer`: its deepstack features added at the visual tokens (as the
        model's own `_deepstack_process`; images' and videos' places never overlap)."""
        for index, deepstack in self.parts:
            if layer < len(deepstack):
                hidden[index] = hidden[index] + deepstack[layer]
        return hidden

    def reaches(self, layer: int) -> bool:
        """Whether deepstack features are added after decoder layer `layer`."""
        return any(layer < len(deepstack) for _, deepstack in self.parts)


def embed(runner, batch, ids: torch.Tensor, hidden: torch.Tensor) -> Visual | None:
    """The batch's images and videos through the vision encoder, their embeddings written into
    `hidden` (T, hidden) in place at the visual tokens of the packed `ids` (T,); None where the batch
    has neither."""
    parts, grids = [], {}
    for pixels_of, grid_of, method, pad_id in _KINDS:
        pixels = [getattr(p, pixels_of) for p in batch if getattr(p, pixels_of) is not None]
        grids[grid_of] = None
        if not pixels:
            continue
        grid = grids[grid_of] = torch.tensor([g for p in batch for g in getattr(p, grid_of)], dtype=torch.long,
                                             device=hidden.device)
        taken, taken_grid = _rounded_up(pixels, grid, runner.merge_size)
        embeds, deepstack = _encoded(runner, method, runner._to_device(taken), taken_grid, len(grid), hidden.dtype)
        index = (ids == getattr(runner, pad_id)).nonzero()[:, 0]
        if index.shape[0] != embeds.shape[0]:
            raise ValueError(f"{index.shape[0]} placeholder tokens for {embeds.shape[0]} visual embeddings")
        hidden[index] = embeds
        parts.append((index, deepstack))
    return Visual(parts, grids) if parts else None


def _encoded(runner, method: str, pixels: torch.Tensor, grid: torch.Tensor, count: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The vision encoder's merged tokens and deepstack features of the first `count` grids (a
    stand-in image after them, `_rounded_up`, is left out): the compiled encoder where TORCH_COMPILE
    made one (runners/vision_encoder.py), else the model's own `method`."""
    if runner.vision_encoder is not None:
        merged, features = runner.vision_encoder(pixels, grid)
        tokens = int(grid[:count].prod(-1).sum()) // runner.merge_size ** 2
        return merged[:tokens].to(dtype), [feature[:tokens].to(dtype) for feature in features]
    out = getattr(runner.model, method)(pixels, grid, return_dict=True)
    return (torch.cat(out.pooler_output[:count], dim=0).to(dtype),
            [torch.cat(feature[:count], dim=0).to(dtype) for feature in out.deepstack_features])


def _rounded_up(pixels: list[np.ndarray], grid: torch.Tensor, merge: int) -> tuple[np.ndarray, torch.Tensor]:
    """The vision encoder's input (patches, patch size: the inputs' `pixels` in one array, copied once)
    and grids, the patches rounded up as a packed forward's tokens are (packed.padded_rows) by a
    stand-in image of zeros after the others (one frame, `merge` patches high): in bfloat16 oneDNN builds a kernel for every row count its matmuls
    meet, and a server's batches of images met new counts all the time (16 small images drawn at
    random: 16.4-17.5 ms in the encoder against 11.7-13.3 for the same batches again; float32's
    kernels showed no gap). The encoder attends within each image, so the stand-in changes no other
    image's output; the caller leaves its outputs out."""
    from .packed import padded_rows  # packed imports this module

    rows = sum(p.shape[0] for p in pixels)
    step = merge * merge  # the stand-in's grid needs whole merged tokens (every image's are)
    extra = -(-padded_rows(rows) // step) * step - rows
    if extra > 0 and rows % step == 0:
        stand_in = torch.tensor([[1, merge, extra // merge]], dtype=grid.dtype, device=grid.device)
        pixels = [*pixels, np.zeros((extra, pixels[0].shape[1]), pixels[0].dtype)]
        grid = torch.cat((grid, stand_in))
    return np.concatenate(pixels), grid


def positions(runner, batch, found: Visual, flat: torch.Tensor, cuts: list[int],
              lengths: list[int]) -> torch.Tensor:
    """(3, T) M-RoPE positions of a packed sequence whose text positions (each row's own tokens at
    prefix length + 0, 1, 2, ...) are `flat` (T,): those in all three for a text row; a row with
    images or videos as the model's `get_rope_index` places its whole prompt, the prefix's columns
    dropped (on the grids `embed` gave the encoder)."""
    out = flat[None].repeat(3, 1)
    rows = [i for i, p in enumerate(batch) if visual(p)]
    width = max(lengths[i] for i in rows)
    placed = prefix_reuse.vision_positions(runner, [batch[i] for i in rows], found.grids, width,
                                           [cuts[i] for i in rows])  # (3, rows, width)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for j, i in enumerate(rows):
        out[:, starts[i]: starts[i] + lengths[i]] = placed[:, j, : lengths[i]]
    return out
