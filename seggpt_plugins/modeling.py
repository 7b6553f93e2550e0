"""The SegGPT forward pass with the original Painter encoder schedule, on transformers' SegGPT modules.

Notation (shapes in comments):
    T   targets in the batch
    N   prompt rows: every (prompt, target) pair is one row; `owner[n]` is the target of row n
    h,w input size of one half (448x448 for ViT-L); the canvas is (2h, w): prompt on top, target below
    Hp,Wp patch grid of the canvas (56x28 for ViT-L); the target half is rows Hp/2..Hp
    C   hidden size, d head dim, p patch size

Painter's feature ensemble: after attention in every block, the target half of the features is
averaged over the prompts of the same target; in blocks 0..merge_index within each stream (image
and mask) separately, afterwards over the merged rows. A target with one prompt is never averaged.
The mean may be weighted per prompt row (`weight`, (N,)): propagation lets its memory of predicted
frames weigh no more than the annotated examples (propagation.py).
Because averaging only happens within a target's own rows, a target's result does not depend on
what else is in its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ATTENTION_KERNELS = ("eager", "sdpa", "folded", "flex", "chunked")


def half_size(config) -> tuple[int, int]:
    """(h, w) of one half of the canvas, from the config's full image_size (2h, w)."""
    size = config.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return height // 2, width


def normalize(images_0_255: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) in 0..255 -> ImageNet-normalised."""
    mean = images_0_255.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images_0_255.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images_0_255 / 255.0 - mean) / std


def denormalize(normalized: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (B, 3, h, w) -> 0..255 (clipped, float)."""
    mean = normalized.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = normalized.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((normalized * std + mean) * 255.0).clamp(0, 255)


# ----------------------------------------------------------------------------------------- attention


def relative_position_tables(attention, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rh (Hp, Hp, d) and Rw (Wp, Wp, d): the relative-position embedding for each (query, key) row/column."""
    return (attention.get_rel_pos(grid_h, grid_h, attention.rel_pos_h),
            attention.get_rel_pos(grid_w, grid_w, attention.rel_pos_w))


def attention_forward(attention, hidden: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """Multi-head self-attention with decomposed relative positions, as transformers' SegGptAttention.

    kernel "eager":  softmax(q k^T * d^-0.5 + rel_h + rel_w) v with the full N x N matrix (the reference).
    kernel "sdpa":   scaled_dot_product_attention with the relative-position bias as an additive mask.
    kernel "folded": the bias folded into the dot product, so fused kernels never build an N x N bias:
                     q' = [q d^-0.5, q.Rh(row), q.Rw(col)], k' = [k, onehot(key row), onehot(key col)].
    kernel "flex":   FlexAttention with the bias as a score_mod (compiled; CUDA).
    kernel "chunked": a few heads at a time, the bias added in place (fp32) or folded into the product
                     (bf16); fastest on CPU: the N x N scores of those heads stay the only large buffer.
    """
    return attention.proj(attend(attention, attention.qkv(hidden), kernel))


def attend(attention, qkv: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """The attention core, before the output projection: qkv (B, Hp, Wp, 3C) -> (B, Hp, Wp, C)."""
    batch, grid_h, grid_w, _ = qkv.shape
    heads = attention.num_attention_heads
    tokens = grid_h * grid_w
    # qkv: (3, B, heads, N, d)
    qkv = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    head_dim = query.shape[-1]

    if not attention.use_relative_position_embeddings:
        out = F.scaled_dot_product_attention(query, key, value)
    else:
        rel_pos_h, rel_pos_w = relative_position_tables(attention, grid_h, grid_w)
        rel_pos_h, rel_pos_w = rel_pos_h.to(query.dtype), rel_pos_w.to(query.dtype)
        q_grid = query.reshape(batch, heads, grid_h, grid_w, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_pos_h).reshape(batch, heads, tokens, grid_h)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_pos_w).reshape(batch, heads, tokens, grid_w)
        if kernel == "folded":
            out = _folded_attention(query, key, value, rel_h, rel_w, grid_h, grid_w, attention.scale)
        elif kernel == "flex":
            out = _flex_attention(query, key, value, rel_h, rel_w, grid_w, attention.scale)
        elif kernel == "chunked":
            out = _chunked_attention(query, key, value, rel_h, rel_w, grid_h, grid_w, attention.scale)
        else:
            # bias: (B, heads, N, N) = rel_h over key rows + rel_w over key columns
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, heads, tokens, tokens)
            if kernel == "eager":
                weights = (query * attention.scale) @ key.transpose(-2, -1) + bias
                out = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype) @ value
            elif kernel == "sdpa":
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=attention.scale)
            else:
                raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    # out: (B, heads, N, d) -> (B, Hp, Wp, C)
    return out.permute(0, 2, 1, 3).reshape(batch, grid_h, grid_w, heads * head_dim)


def _chunked_attention(query, key, value, rel_h, rel_w, grid_h, grid_w, scale, scores_bytes: int = 32 << 20):
    """softmax(q k^T * scale + rel_h + rel_w) v, head by head in float32 (the bias added to the scores in
    place), a few heads at a time in reduced precision (their N x N scores, at most `scores_bytes`, stay the
    only large buffer). There broadcast adds are slow on CPU, so the bias is folded
    into the product as the folded kernel does: q' = [q scale, rel_h, rel_w], k' = [k, onehot(key row),
    onehot(key col)], and one matrix product gives the biased scores."""
    batch, heads, tokens, head_dim = query.shape
    v = value.reshape(batch * heads, tokens, head_dim)
    out = []
    if query.dtype == torch.float32:  # one head at a time: measured fastest in fp32 (its scores stay in cache)
        step = 1
        q = (query * scale).reshape(batch * heads, tokens, head_dim)
        k = key.reshape(batch * heads, tokens, head_dim).transpose(1, 2)
        rel_h = rel_h.reshape(batch * heads, tokens, grid_h, 1)
        rel_w = rel_w.reshape(batch * heads, tokens, 1, grid_w)
        for start in range(0, batch * heads, step):
            group = slice(start, start + step)
            scores = torch.bmm(q[group], k[group])  # (heads in the group, N, N)
            scores.view(-1, tokens, grid_h, grid_w).add_(rel_h[group]).add_(rel_w[group])
            out.append(torch.bmm(torch.softmax(scores, dim=-1), v[group]))
    else:
        step = max(1, scores_bytes // (tokens * tokens * query.element_size()))
        rows = torch.arange(tokens, device=query.device) // grid_w
        cols = torch.arange(tokens, device=query.device) % grid_w
        # onehot: (Hp + Wp, N): which row and column each key sits in
        onehot = torch.cat([F.one_hot(rows, grid_h), F.one_hot(cols, grid_w)], dim=1).to(key.dtype).T
        # q: (B heads, N, d + Hp + Wp); k: (B heads, d + Hp + Wp, N)
        q = torch.cat([query * scale, rel_h, rel_w], dim=-1).reshape(batch * heads, tokens, -1)
        k = torch.cat([key.transpose(-2, -1), onehot.expand(batch, heads, -1, -1)], dim=-2).reshape(
            batch * heads, -1, tokens)
        for start in range(0, batch * heads, step):
            group = slice(start, start + step)
            out.append(torch.bmm(torch.softmax(torch.bmm(q[group], k[group]), dim=-1), v[group]))
    return torch.cat(out).reshape(batch, heads, tokens, head_dim)


_compiled_flex = None


def _flex_attention(query, key, value, rel_h, rel_w, grid_w, scale):
    """FlexAttention (a compiled flash-style kernel) with the relative-position bias as a score_mod:
    head dim stays d and no N x N bias exists anywhere."""
    global _compiled_flex
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)  # recompiles once with dynamic shapes

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + rel_h[b, h, q_idx, kv_idx // grid_w] + rel_w[b, h, q_idx, kv_idx % grid_w]

    return _compiled_flex(query, key, value, score_mod=score_mod, scale=scale)


def _folded_attention(query, key, value, rel_h, rel_w, grid_h, grid_w, scale):
    """q'.k' = q.k * scale + rel_h[key row] + rel_w[key col], computed by one fused SDPA call (scale 1)."""
    batch, heads, tokens, head_dim = query.shape
    rows = torch.arange(tokens, device=query.device) // grid_w
    cols = torch.arange(tokens, device=query.device) % grid_w
    # key extras: (N, Hp + Wp) one-hot of each key's row and column
    onehot = torch.cat([F.one_hot(rows, grid_h), F.one_hot(cols, grid_w)], dim=1).to(key.dtype)
    extra = grid_h + grid_w
    folded_dim = head_dim + extra
    padded_dim = -(-folded_dim // 8) * 8  # fused CUDA kernels want a multiple of 8
    pad = padded_dim - folded_dim
    q_folded = torch.cat([query * scale, rel_h, rel_w], dim=-1)
    k_folded = torch.cat([key, onehot.expand(batch, heads, tokens, extra)], dim=-1)
    if query.is_cuda:
        # flash/efficient kernels want q, k and v of one head size: pad all three with zeros
        q_folded = F.pad(q_folded, (0, pad))
        k_folded = F.pad(k_folded, (0, pad))
        value_padded = F.pad(value, (0, padded_dim - head_dim))
        return F.scaled_dot_product_attention(q_folded, k_folded, value_padded, scale=1.0)[..., :head_dim]
    return F.scaled_dot_product_attention(q_folded, k_folded, value, scale=1.0)


# ------------------------------------------------------------------------------------------ encoder


def embed(net, image_canvas: torch.Tensor, mask_canvas: torch.Tensor, seg_type: str) -> torch.Tensor:
    """Patch, segment, position and type embeddings; the target half of the mask stream is the mask token.

    image_canvas, mask_canvas: (N, 3, 2h, w) normalised. Returns (2N, Hp, Wp, C): image stream, then mask stream.
    """
    embeddings = net.model.embeddings
    num_patches = embeddings.patch_embeddings.num_patches
    bool_masked_pos = torch.zeros(1, num_patches, dtype=torch.bool, device=image_canvas.device)
    bool_masked_pos[:, num_patches // 2:] = True
    return embeddings(image_canvas, mask_canvas, bool_masked_pos=bool_masked_pos, embedding_type=seg_type)


def _group_mean(rows: torch.Tensor, group: torch.Tensor, num_groups: int,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B, ...) -> (num_groups, ...): the mean of the rows of each group (weighted by `weight` (B,))."""
    flat = rows.reshape(rows.shape[0], -1)
    if weight is None:
        weight = flat.new_ones(group.shape[0])
    else:
        weight = weight.to(flat.dtype)
        flat = flat * weight[:, None]
    sums = flat.new_zeros(num_groups, flat.shape[1]).index_add_(0, group, flat)
    totals = flat.new_zeros(num_groups).index_add_(0, group, weight).clamp_min(1e-6)  # no host sync
    return (sums / totals[:, None]).reshape(num_groups, *rows.shape[1:])


def encode(net, hidden: torch.Tensor, owner: torch.Tensor, num_targets: int, kernel: str = "sdpa",
           weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run the encoder blocks with Painter's ensemble schedule.

    hidden: (2N, Hp, Wp, C) from `embed` (image stream rows, then mask stream rows); owner: (N,) long,
    the target of each prompt row (every target owns at least one row); weight: (N,) or None, each prompt
    row's weight in its target's mean (None: all equal).

    Under the ensemble the target half is the same on every prompt row of a target (it starts equal
    and every block averages it over those rows), so it is carried once per target and stream: layer
    norms, QKV, projection and MLP of the target half run once per target, not once per prompt. Only
    attention runs per prompt row, on the full canvas [prompt half; its target's half]; its output on
    the target half is averaged over the target's prompts (the ensemble; with one prompt, nothing).

    Returns the normalised features after each of config.intermediate_hidden_state_indices, each
    (T, Hp/2 + 1, Wp, C): the last patch row of each target's first prompt (context for the decoder's
    3x3 convolution), then the target half.
    """
    config = net.config
    encoder = net.model.encoder
    rows, half = owner.shape[0], hidden.shape[1] // 2
    first = torch.full((num_targets,), rows, dtype=torch.long, device=owner.device)
    first = first.scatter_reduce(0, owner, torch.arange(rows, device=owner.device), "amin")  # (T,)
    group = torch.cat([owner, owner + num_targets])  # (2N,): row -> (stream, target)
    row_weight = None if weight is None else torch.cat([weight, weight])  # (2N,)
    prompt = hidden[:, :half]  # (2N, Hp/2, Wp, C)
    target = hidden[torch.cat([first, first + rows]), half:]  # (2T, Hp/2, Wp, C)
    final = max(config.intermediate_hidden_state_indices)
    merged = False
    features = []
    for index, layer in enumerate(encoder.layers[:final + 1]):
        attention = layer.attention
        qkv_target = attention.qkv(layer.layernorm_before(target))
        qkv = torch.cat([attention.qkv(layer.layernorm_before(prompt)), qkv_target[group]], dim=1)
        attended = attend(attention, qkv, kernel)  # (R, Hp, Wp, C), R prompt rows
        prompt = prompt + layer.drop_path(attention.proj(attended[:, :half]))
        target_attended = _group_mean(attended[:, half:], group, target.shape[0], row_weight)  # the ensemble
        target = target + layer.drop_path(attention.proj(target_attended))
        target = target + layer.drop_path(layer.mlp(layer.layernorm_after(target)))
        if index < final:
            prompt = prompt + layer.drop_path(layer.mlp(layer.layernorm_after(prompt)))
            context = None
        else:  # the last block: of the prompt half only the decoder's context row is still needed
            context = prompt[first if merged else torch.cat([first, first + rows]), -1:]
            context = context + layer.drop_path(layer.mlp(layer.layernorm_after(context)))
        if index == config.merge_index:  # merge image and mask streams
            if context is None:
                prompt = (prompt[:rows] + prompt[rows:]) * 0.5
            else:
                context = (context[:num_targets] + context[num_targets:]) * 0.5
            target = (target[:num_targets] + target[num_targets:]) * 0.5
            group, row_weight, merged = owner, weight, True
        if index in config.intermediate_hidden_state_indices:
            context = prompt[first, -1:] if context is None else context
            features.append(encoder.layernorm(torch.cat([context, target], dim=1)))
    return features


# ------------------------------------------------------------------------------------------ decoder


def decode(net, features: list[torch.Tensor]) -> torch.Tensor:
    """Features (T, Hp/2 + 1, Wp, C) x 4 -> (T, 3, h, w) normalised paintings of the target halves.

    The decoder's 3x3 convolution looks one pixel across the prompt/target boundary, so one patch row
    of the prompt half is decoded with the target half and cropped off afterwards: the result equals
    decoding the whole canvas and keeping the bottom half.
    """
    decoder = net.decoder
    stacked = torch.cat(features, dim=-1)  # (T, Hp/2 + 1, Wp, 4C)
    pixels = decoder._reshape_hidden_states(decoder.decoder_embed(stacked))  # (T, D, (Hp/2+1)p, Wp p)
    return decoder.decoder_pred(pixels)[:, :, decoder.patch_size:]


def paint(net, targets: torch.Tensor, prompt_images: torch.Tensor, prompt_masks: torch.Tensor,
          owner: torch.Tensor, seg_type: str = "instance", kernel: str = "sdpa",
          weight: torch.Tensor | None = None) -> torch.Tensor:
    """In-context painting.

    targets: (T, 3, h, w); prompt_images, prompt_masks: (N, 3, h, w); owner: (N,) long in 0..T-1;
    all normalised; weight: (N,) each prompt's weight in its target's ensemble (None: equal).
    Returns (T, 3, h, w) normalised paintings of the targets.
    """
    image_canvas = torch.cat([prompt_images, targets[owner]], dim=2)  # (N, 3, 2h, w)
    mask_canvas = torch.cat([prompt_masks, prompt_masks], dim=2)  # target half hidden by the mask token
    hidden = embed(net, image_canvas, mask_canvas, seg_type)
    return decode(net, encode(net, hidden, owner, targets.shape[0], kernel, weight))
