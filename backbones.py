"""
backbones.py — the pretrained backbones every method starts from.

  modules      own ViT (pre-LN) and BERT-style layers (optional cross-attention, causal masks,
               attention maps)
  HF weights   vit_from_hf / bert_from_hf copy Hugging Face weights into them by an explicit key map
  releases     release_config / llava_from_hf: --init_from a released BLIP or LLaVA
  loading      load_backbone / load_tokenizer: a Hugging Face id, a local folder or a built-in name
  built-ins    shapes-tiny-vision / -text / -lm: tiny unimodal models trained on ShapesWorld on
               first use and saved with save_pretrained, so they load through the same
               from_pretrained path as a real checkpoint, offline. None sees an image-text pair.

  stand-ins    write_stand_ins: the --data coco presets' backbones (published architectures, random
               weights) and a COCO-layout folder, so every preset runs end to end offline.

    python backbones.py    # build (or find) the three built-ins and print their unimodal quality
    python backbones.py --paper_scale DIR [--tiny]   # paper-scale stand-ins (~11 GB; --tiny: MBs)
"""
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import tokenizers
import transformers
from tokenizers import models, normalizers, pre_tokenizers, processors
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from common import RunConfig, lr_at, set_lr
from data import (ATTRIBUTE_WORDS, COLORS, NUMBERS, PLURALS, SHAPES, SIZES, ShapesWorld,
                  UserError)

# ----------------------------------------------------------------------------- modules + HF weights
# Own ViT and BERT-style modules in plain PyTorch, so a method can open them up (cross-attention,
# causal masks, attention maps, its own attention in a BertLayer subclass) without fighting a
# library. Pretrained weights are copied in from a Hugging Face model object by an explicit key map
# (nanoGPT / nanoVLM style); HF names are those of transformers >= 5 (from_pretrained already
# renames old checkpoints, e.g. ViT's attention.attention.query -> attention.q_proj).


def padding_mask(attention_mask, dtype=torch.float32):
    """(B, L) with 1 = token, 0 = pad -> additive mask (B, 1, 1, L): 0 visible, finfo.min hidden.
    finfo.min, not -1e10 (-inf in fp16) or -inf (a row with no visible key would give NaN)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(L, device=None, dtype=torch.float32):
    """(L, L) additive mask: query i sees keys j <= i. Combine with a padding mask by adding."""
    return torch.full((L, L), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)


def right_to_left_padding(x, mask):
    """Right-padded rows -> left-padded (rotated by their pad count) for batched decoder-only
    generation: a row continues right after its last token. x (B, T, ...), mask (B, T) 1 = token."""
    T = mask.shape[1]
    order = (torch.arange(T, device=mask.device) - (mask == 0).sum(1, keepdim=True)) % T  # (B, T)
    index = order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x)  # (B, T, ...) like x
    return x.gather(1, index), mask.gather(1, order)


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def checkpointed(fn, *args, on=False, **kwargs):
    """fn(*args, **kwargs), with activation checkpointing when `on` and autograd is recording:
    activations are recomputed in backward instead of stored. Stacks call it per layer:
    x = checkpointed(layer, x, mask, on=...)."""
    if on and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


class QuickGELU(nn.Module):
    def forward(self, x):  # CLIP's activation
        return x * torch.sigmoid(1.702 * x)


def activation(name):
    """HF config.hidden_act -> module ('gelu' is the exact erf GELU, as in HF)."""
    acts = {'gelu': nn.GELU, 'gelu_new': lambda: nn.GELU(approximate='tanh'),
            'gelu_pytorch_tanh': lambda: nn.GELU(approximate='tanh'), 'quick_gelu': QuickGELU}
    if name not in acts:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(acts)}")
    return acts[name]()


class Attention(nn.Module):
    """Multi-head attention: self-attention (context=None) or cross-attention to context
    (B, Lk, kv_dim). The fused SDPA kernel computes it; the explicit softmax runs only when the
    caller asks for the probabilities (attention maps, saliency). Both compute the same thing."""

    def __init__(self, dim, heads, qkv_bias=True, kv_dim=None, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(kv_dim or dim, dim, bias=qkv_bias)
        self.v = nn.Linear(kv_dim or dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None, return_attn=False):
        """x (B, Lq, dim), mask additive, broadcastable to (B, heads, Lq, Lk) -> (out (B, Lq, dim),
        probs): probs (B, heads, Lq, Lk) when return_attn, else None. One return type keeps callers
        uniform."""
        context = x if context is None else context
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))  # (B, H, L, Dh)
        if mask is not None:
            # Summing two masks (min + min) or casting to fp16 gives -inf, and a row of -inf is NaN
            # after the softmax; clamping to finfo.min keeps a row with no visible key finite
            # (uniform weights).
            mask = mask.to(q.dtype).clamp(min=torch.finfo(q.dtype).min)
        p_drop = self.dropout if self.training else 0.0
        probs = None
        if return_attn:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])          # (B, H, Lq, Lk)
            scores = scores if mask is None else scores + mask
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = F.dropout(probs, p_drop, self.training) @ v                  # (B, H, Lq, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self.proj(out.transpose(1, 2).flatten(2)), probs                # (B, Lq, dim)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act='gelu'):
        super().__init__()
        self.fc1, self.act = nn.Linear(dim, hidden), activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_dim, act='gelu', eps=1e-6, qkv_bias=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), MLP(dim, mlp_dim, act)

    def forward(self, x, mask=None, return_attn=False):
        # (B, L, D) -> (B, L, D), or (x, probs (B, heads, L, L)) with return_attn
        h, probs = self.attn(self.norm1(x), mask=mask, return_attn=return_attn)
        x = x + h
        x = x + self.mlp(self.norm2(x))
        return (x, probs) if return_attn else x


def interpolate_pos_embed(pos_embed, n_special, grid):
    """(1, n_special + g*g, D) -> (1, n_special + grid*grid, D): bicubic resize of the
    patch-position grid, the CLS/distillation positions kept, as ALBEF's interpolate_pos_embed and
    HF's interpolate_pos_encoding do."""
    special, patches = pos_embed[:, :n_special], pos_embed[:, n_special:]
    old, D = math.isqrt(patches.shape[1]), patches.shape[2]
    if old == grid:
        return pos_embed
    patches = patches.reshape(1, old, old, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode='bicubic', align_corners=False)
    return torch.cat([special, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D)], dim=1)


class VisionTransformer(nn.Module):
    """Pre-LN ViT: patches + [CLS] (+ DeiT's distillation token) + learned positions -> (optional
    pre-LN, CLIP) -> blocks -> final LN. Returns all tokens (B, n_special + N, D). With
    final_norm=False (CLIP) the output is the un-normalised residual stream, exactly HF CLIP's
    last_hidden_state; `self.norm` then holds CLIP's post_layernorm, which HF applies to the CLS
    only: vit.norm(out[:, 0]) == HF pooler_output."""

    def __init__(self, image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072,
                 channels=3, distill_token=False, pre_norm=False, final_norm=True, patch_bias=True,
                 act='gelu', eps=1e-6, qkv_bias=True):
        super().__init__()
        self.patch_size, self.final_norm, self.grad_checkpointing = patch_size, final_norm, False
        self.n_special = 2 if distill_token else 1
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if distill_token else None
        n_tokens = self.n_special + (image_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.pre_norm = nn.LayerNorm(dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_dim, act, eps, qkv_bias)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, images, return_attn=False):
        """(B, C, H, W) -> (B, n_special + N, D); with return_attn also the last block's attention
        probabilities (B, heads, L, L) (its [CLS] row ranks the patches)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        special = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        x = torch.cat([t.expand(len(x), -1, -1) for t in special] + [x], dim=1) + self.pos_embed
        x = self.pre_norm(x)
        for block in self.blocks[:-1] if return_attn else self.blocks:
            x = checkpointed(block, x, on=self.grad_checkpointing)
        if return_attn:
            x, probs = self.blocks[-1](x, return_attn=True)
        x = self.norm(x) if self.final_norm else x
        return (x, probs) if return_attn else x


class BertEmbeddings(nn.Module):
    """word + position + token-type-0 embeddings -> LayerNorm -> dropout (every method feeds one
    segment)."""

    def __init__(self, vocab_size, dim, max_len=512, type_vocab=2, eps=1e-12, dropout=0.0,
                 pad_id=0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_id)  # pad row: no grad, as HF
        self.position, self.token_type = nn.Embedding(max_len, dim), nn.Embedding(type_vocab, dim)
        self.norm, self.drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(pos) + self.token_type.weight[0]
        return self.drop(self.norm(x))


class BertLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + self_attn(x)) -> [x = LN(x + cross_attn(x, context))] ->
    x = LN(x + FFN(x)). Self-attention mask: padding and/or causal (additive). Cross-attention is
    skipped when context is None (as HF does), so a fusion layer can also run text-only."""

    def __init__(self, dim, heads, mlp_dim, cross_attention=False, cross_dim=None, eps=1e-12,
                 act='gelu', dropout=0.0, attention=Attention):
        super().__init__()
        self.self_attn = attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = (attention(dim, heads, kv_dim=cross_dim, dropout=dropout)
                           if cross_attention else None)
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.mlp, self.norm2 = MLP(dim, mlp_dim, act), nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, context=None, context_mask=None, return_attn=False):
        """x (B, L, D), context (B, Lc, cross_dim) -> x (B, L, D), or
        (x, (self_probs, cross_probs))."""
        h, self_probs = self.self_attn(x, mask=mask, return_attn=return_attn)
        x = self.norm1(x + self.drop(h))
        cross_probs = None
        if self.cross_attn is not None and context is not None:
            h, cross_probs = self.cross_attn(x, context, context_mask, return_attn)
            x = self.norm_cross(x + self.drop(h))
        x = self.norm2(x + self.drop(self.mlp(x)))
        return (x, (self_probs, cross_probs)) if return_attn else x


class MLMHead(nn.Module):
    """BERT's LM head: dense -> act -> LN -> decoder whose weight IS the word embedding matrix
    (tied), own bias."""

    def __init__(self, word_embeddings, eps=1e-12, act='gelu'):
        super().__init__()
        vocab_size, dim = word_embeddings.weight.shape
        self.dense, self.act = nn.Linear(dim, dim), activation(act)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x):  # (B, L, D) -> logits (B, L, vocab)
        return self.decoder(self.norm(self.act(self.dense(x))))


def copy_hf_weights(module, hf_state, key_map):
    """Copy tensors from an HF state dict into module. key_map: {our module or parameter name: HF
    name}; a parameter follows its module ('attn.q.weight' <- key_map['attn.q'] + '.weight').
    Returns our keys that the HF model lacks (left at init). A key of ours that no entry covers is
    a bug in the map and raises."""
    loaded, new = {}, []
    for key, tensor in module.state_dict().items():
        ours = next((p for p in key_map if key == p or key.startswith(p + '.')), None)
        if ours is None:
            raise KeyError(f"no HF key mapped for {key!r}")
        theirs = key_map[ours] + key[len(ours):]
        if theirs in hf_state:
            loaded[key] = hf_state[theirs].reshape(tensor.shape)  # CLIP: cls (D,), positions (N, D)
        else:
            new.append(key)
    module.load_state_dict(loaded, strict=False)
    return new


def vit_from_hf(hf_model, image_size=None):
    """HF ViTModel / DeiTModel / CLIPVisionModel / BlipVisionModel (or a model wrapping one) ->
    VisionTransformer whose output equals HF's last_hidden_state. image_size other than the
    checkpoint's interpolates the position embeddings. Not copied: ViT/DeiT's pooler (dense+tanh,
    unused by the methods) and the MIM mask token."""
    for attr in ('vision_model', 'vit', 'deit'):  # CLIPModel, *ForImageClassification wrap it
        hf_model = getattr(hf_model, attr, hf_model)
    c = hf_model.config
    if c.model_type not in ('vit', 'deit', 'clip_vision_model', 'blip_vision_model'):
        raise ValueError(f"vit_from_hf supports ViT, DeiT, CLIP and BLIP vision models, "
                         f"got {c.model_type!r}")
    clip, image_size = c.model_type == 'clip_vision_model', image_size or c.image_size
    state = hf_model.state_dict()
    channels = getattr(c, 'num_channels', 3)  # BLIP's config has none: RGB
    vit = VisionTransformer(image_size, c.patch_size, c.hidden_size, c.num_hidden_layers,
                            c.num_attention_heads, c.intermediate_size, channels,
                            distill_token=c.model_type == 'deit', pre_norm=clip,
                            final_norm=not clip, patch_bias=not clip, act=c.hidden_act,
                            eps=c.layer_norm_eps, qkv_bias=getattr(c, 'qkv_bias', True))
    e, layer = 'embeddings.', 'encoder.layers.{}.'
    block = {'norm1': 'layer_norm1', 'norm2': 'layer_norm2', 'mlp.fc1': 'mlp.fc1',
             'mlp.fc2': 'mlp.fc2'}  # CLIP's and BLIP's; ViT's below
    if clip:
        key_map = {'cls_token': e + 'class_embedding', 'pos_embed': e + 'position_embedding.weight',
                   'patch_embed': e + 'patch_embedding', 'pre_norm': 'pre_layrnorm',
                   'norm': 'post_layernorm'}
        block.update({'attn.proj': 'self_attn.out_proj',
                      **{f'attn.{t}': f'self_attn.{t}_proj' for t in 'qkv'}})
    elif c.model_type == 'blip_vision_model':  # one fused qkv, post-LN on every token
        key_map = {'cls_token': e + 'class_embedding', 'pos_embed': e + 'position_embedding',
                   'patch_embed': e + 'patch_embedding', 'norm': 'post_layernorm'}
        block.update({'attn.proj': 'self_attn.projection',
                      **{f'attn.{t}': f'self_attn.{t}' for t in 'qkv'}})
        for key in [k for k in state if '.self_attn.qkv.' in k]:  # rows: q, k, v (all heads)
            for t, part in zip('qkv', state.pop(key).chunk(3)):
                state[key.replace('.qkv.', f'.{t}.')] = part
    else:
        key_map = {'cls_token': e + 'cls_token', 'dist_token': e + 'distillation_token',
                   'pos_embed': e + 'position_embeddings',
                   'patch_embed': e + 'patch_embeddings.projection', 'norm': 'layernorm'}
        layer = 'layers.{}.'
        block = {'norm1': 'layernorm_before', 'attn.proj': 'attention.o_proj',
                 'norm2': 'layernorm_after', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
                 **{f'attn.{t}': f'attention.{t}_proj' for t in 'qkv'}}
    for i in range(c.num_hidden_layers):
        key_map.update({f'blocks.{i}.{ours}': layer.format(i) + theirs
                        for ours, theirs in block.items()})
    pos = state[key_map['pos_embed']].reshape(1, -1, c.hidden_size)
    grid = image_size // c.patch_size
    state[key_map['pos_embed']] = interpolate_pos_embed(pos, vit.n_special, grid)
    missing = copy_hf_weights(vit, state, key_map)
    if missing:
        raise KeyError(f"HF {type(hf_model).__name__} lacks {missing}")
    return vit


_BERT_LAYER_KEYS = {  # our BertLayer module -> HF BertLayer module
    'self_attn.proj': 'attention.output.dense', 'norm1': 'attention.output.LayerNorm',
    'cross_attn.proj': 'crossattention.output.dense',
    'norm_cross': 'crossattention.output.LayerNorm',
    'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense', 'norm2': 'output.LayerNorm',
    **{f'{a}.{t}': f'{b}.self.{name}'
       for a, b in (('self_attn', 'attention'), ('cross_attn', 'crossattention'))
       for t, name in (('q', 'query'), ('k', 'key'), ('v', 'value'))}}


def bert_from_hf(hf_model, cross_layers=(), cross_dim=None, layer_class=None):
    """HF BertModel or BertForMaskedLM (or BLIP's text decoder) -> (BertEmbeddings, nn.ModuleList
    of BertLayer, MLMHead, new_keys). layer_class: a subclass of BertLayer (same parameters, its
    own forward) to build the layers with. Layers whose index is in cross_layers get
    cross-attention to a context of width cross_dim (default hidden); its weights are new unless
    the HF model has them. The MLM head comes from BertForMaskedLM.cls.predictions (new for a
    bare BertModel). new_keys lists every parameter left at init, for the caller to report.
    Dropout: HF's hidden_dropout_prob is used for hidden states and attention probabilities
    alike."""
    bert = getattr(hf_model, 'bert', hf_model)
    c, state, p = bert.config, hf_model.state_dict(), 'bert.' if bert is not hf_model else ''
    # BLIP's text model has no token types: one zero row, so the sum is HF's
    type_vocab = getattr(c, 'type_vocab_size', 1)
    emb = BertEmbeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings, type_vocab,
                         c.layer_norm_eps, c.hidden_dropout_prob, c.pad_token_id)
    e = p + 'embeddings.'
    new = copy_hf_weights(emb, state, {'word': e + 'word_embeddings',
                                       'position': e + 'position_embeddings',
                                       'token_type': e + 'token_type_embeddings',
                                       'norm': e + 'LayerNorm'})
    if not hasattr(c, 'type_vocab_size'):
        nn.init.zeros_(emb.token_type.weight)
        new.remove('token_type.weight')
    layers = nn.ModuleList()
    for i in range(c.num_hidden_layers):
        layers.append((layer_class or BertLayer)(
            c.hidden_size, c.num_attention_heads, c.intermediate_size, i in cross_layers, cross_dim,
            c.layer_norm_eps, c.hidden_act, c.hidden_dropout_prob))
        key_map = {ours: f'{p}encoder.layer.{i}.{theirs}'
                   for ours, theirs in _BERT_LAYER_KEYS.items()}
        new += [f'layers.{i}.{k}' for k in copy_hf_weights(layers[i], state, key_map)]
    head = MLMHead(emb.word, c.layer_norm_eps, c.hidden_act)
    new += ['mlm_head.' + k for k in copy_hf_weights(head, state, {
        'dense': 'cls.predictions.transform.dense', 'norm': 'cls.predictions.transform.LayerNorm',
        'decoder.weight': e + 'word_embeddings.weight', 'decoder.bias': 'cls.predictions.bias'})]
    return emb, layers, head, new


# ----------------------------------------------------------------------------- built-in backbones

# The built-ins' tokenizer: ShapesWorld's closed vocabulary, word by word.
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '[DEC]')  # BERT's + decoder BOS
VOCAB = SPECIAL_TOKENS + COLORS + SHAPES + PLURALS + SIZES + ATTRIBUTE_WORDS['position'] + (
    'a', 'there', 'is', 'are', 'at', 'the', 'to', 'of', 'and',                # caption grammar
    'what', 'color', 'shape', 'size', 'where', 'how', 'many',                 # questions
    'object', 'objects', 'yes', 'no',
    'question', 'answer', 'picture', 'describe', 'this', 'image',              # prompts
    '?', ':', '.', ',') + NUMBERS + tuple('0123456789')
PROMPTS = ('a picture of', 'describe this image :', 'question :', 'answer :')  # all in VOCAB


def build_tokenizer(size=0):
    """ShapesWorld's word-level tokenizer behind the Hugging Face API (like BERT's): lowercases,
    splits on spaces and punctuation, adds [CLS] ... [SEP]; [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    [DEC]=5 (decoder BOS, bos_token). save_pretrained / AutoTokenizer.from_pretrained round-trip.
    size: padded with [unused k] words to that many ids (a stand-in for a real vocabulary)."""
    words = VOCAB + tuple(f'[unused{k}]' for k in range(size - len(VOCAB)))
    word_ids = {w: i for i, w in enumerate(words)}
    core = tokenizers.Tokenizer(models.WordLevel(word_ids, unk_token='[UNK]'))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
        sep_token='[SEP]', mask_token='[MASK]', bos_token='[DEC]', eos_token='[SEP]',
        model_max_length=128)


BACKBONE_DIR = Path(os.environ.get('NANOALIGN_BACKBONES', 'out/backbones'))


def builtin_backbone(name, cache_dir=None, steps=None):
    """Folder of a built-in backbone, training it first if it is not there yet. Under torchrun
    rank 0 trains while the others wait. `steps` overrides the training length (tests use a few)."""
    if name not in BUILTIN_BACKBONES:
        raise UserError(f"unknown built-in backbone '{name}'; "
                        f"the built-ins are {', '.join(BUILTIN_BACKBONES)}")
    path = Path(cache_dir or BACKBONE_DIR) / name
    distributed = dist.is_available() and dist.is_initialized()
    if not (path / 'config.json').exists() and (not distributed or dist.get_rank() == 0):
        pretrain, default_steps = BUILTIN_BACKBONES[name]
        torch.manual_seed(0)
        start = time.perf_counter()
        model, tokenizer, quality = pretrain(steps or default_steps, desc=f"building {name}")
        quality.update(steps=steps or default_steps, seconds=round(time.perf_counter() - start, 1))
        tmp = path.with_name(path.name + '.tmp')
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / 'quality.json').write_text(json.dumps(quality, indent=2))
        os.replace(tmp, path)
        tqdm.write(f"{name}: {quality} -> {path}")
    if distributed:
        dist.barrier()
    return str(path)


def _train_loop(model, params, steps, desc, batch_fn, lr=1e-3):
    """The few lines every built-in pretraining shares: AdamW, warm-up + cosine, tqdm."""
    cfg = RunConfig(lr=lr, max_steps=steps, warmup_steps=max(1, steps // 20))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, dynamic_ncols=True)):
        set_lr(opt, lr_at(step, cfg))
        loss = batch_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def _shapes_images(world, split, indices):
    """(B, 3, H, W) normalised images and their scenes."""
    images = torch.stack([world.transform(world.image(split, i)) for i in indices])
    return images, [world.scene(split, i) for i in indices]


def _cell_targets(scenes):
    """(B, 9, 3) per grid cell: colour, shape, size class, with class 0 = empty cell."""
    t = torch.zeros(len(scenes), 9, 3, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for obj in scene:
            t[b, obj['row'] * 3 + obj['col']] = torch.tensor([COLORS.index(obj['color']) + 1,
                                                              SHAPES.index(obj['shape']) + 1,
                                                              SIZES.index(obj['size']) + 1])
    return t


def _presence_targets(scenes):
    """(B, 23) multi-hot: which colours, shapes, sizes and cells occur in the scene."""
    t = torch.zeros(len(scenes), len(COLORS) + len(SHAPES) + len(SIZES) + 9)
    for b, scene in enumerate(scenes):
        for obj in scene:
            t[b, [COLORS.index(obj['color']), len(COLORS) + SHAPES.index(obj['shape']),
                  len(COLORS) + len(SHAPES) + SIZES.index(obj['size']),
                  len(COLORS) + len(SHAPES) + len(SIZES) + obj['row'] * 3 + obj['col']]] = 1
    return t


def _pretrain_vision(steps, desc, batch_size=64):
    """ViT trained on two tasks: name the colour, shape and size in each 3x3 cell (class 0 = empty)
    from the mean of the patch tokens inside the cell, so patch tokens learn what is where; and say
    which colours, shapes, sizes and cells occur from the [CLS] token, so [CLS] summarises the scene
    the way a classification-pretrained ViT's [CLS] does."""
    world = ShapesWorld(seed=0)
    config = transformers.ViTConfig(image_size=world.image_size, patch_size=8, hidden_size=128,
                                    num_hidden_layers=4, num_attention_heads=4,
                                    intermediate_size=512, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    model = transformers.ViTModel(config)  # with HF's (unused) pooler, as checkpoints have
    n_classes = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
    cell_head = nn.Linear(128, sum(n_classes))
    presence_head = nn.Linear(128, _presence_targets([]).shape[1])
    grid = world.image_size // 8
    cell_of_patch = (torch.arange(grid) * 3 // grid)  # (grid,) patch row/col -> cell row/col
    cell_index = (cell_of_patch[:, None] * 3 + cell_of_patch[None, :]).flatten()  # (N,) -> cell
    pool = F.one_hot(cell_index, 9).T.float()
    pool = pool / pool.sum(1, keepdim=True)  # (9, N) mean over a cell's patches

    def predict(images):  # -> (colour, shape, size) logits (B, 9, classes), presence logits (B, 23)
        tokens = model(images).last_hidden_state  # (B, 1+N, D)
        return cell_head(pool @ tokens[:, 1:]).split(n_classes, dim=-1), presence_head(tokens[:, 0])

    def batch_fn(step):
        indices = range(step * batch_size, (step + 1) * batch_size)
        images, scenes = _shapes_images(world, 'train', indices)
        cells, presence = predict(images)
        targets = _cell_targets(scenes)
        cell_loss = sum(F.cross_entropy(lg.flatten(0, 1), targets[..., a].flatten())
                        for a, lg in enumerate(cells))
        return cell_loss + F.binary_cross_entropy_with_logits(presence, _presence_targets(scenes))

    params = [*model.parameters(), *cell_head.parameters(), *presence_head.parameters()]
    _train_loop(model, params, steps, desc, batch_fn)
    correct = total = presence_correct = presence_total = 0
    with torch.no_grad():  # on 512 val images: attribute accuracy on occupied cells, presence
        for start in range(0, 512, 128):
            images, scenes = _shapes_images(world, 'val', range(start, start + 128))
            cells, presence = predict(images)
            targets, present = _cell_targets(scenes), _presence_targets(scenes)
            occupied = targets[..., 0] > 0
            correct += sum((lg.argmax(-1) == targets[..., a])[occupied].sum().item()
                           for a, lg in enumerate(cells))
            total += 3 * occupied.sum().item()
            presence_correct += ((presence > 0) == present.bool()).sum().item()
            presence_total += present.numel()
    return model, None, dict(val_attribute_acc=round(100 * correct / total, 2),
                             val_presence_acc=round(100 * presence_correct / presence_total, 2))


def _caption_batch(world, tokenizer, split, indices):
    """Tokenised captions (one per index, cycling through the 5) for text pretraining."""
    captions = [world.captions(split, i)[i % 5] for i in indices]
    return tokenizer(captions, padding=True, return_tensors='pt')


def _pretrain_text(steps, desc, batch_size=128):
    """BERT masked-LM on ShapesWorld captions (text only)."""
    world, tokenizer = ShapesWorld(seed=0), build_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=128,
                                     num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     pad_token_id=tokenizer.pad_token_id)
    model = transformers.BertForMaskedLM(config)
    masker = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    def masked(split, indices):
        enc = _caption_batch(world, tokenizer, split, indices)
        rows = zip(enc.input_ids, enc.attention_mask)
        return masker([dict(input_ids=ids, attention_mask=m) for ids, m in rows])

    def batch_fn(step):
        return model(**masked('train', range(step * batch_size, (step + 1) * batch_size))).loss

    _train_loop(model, list(model.parameters()), steps, desc, batch_fn)
    torch.manual_seed(0)
    correct = total = 0
    with torch.no_grad():  # masked-token accuracy on 1000 val captions
        for start in range(0, 1000, 250):
            batch = masked('val', range(start, start + 250))
            out = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
            predicted = out.logits.argmax(-1)
            labelled = batch['labels'] != -100
            correct += (predicted == batch['labels'])[labelled].sum().item()
            total += labelled.sum().item()
    return model, tokenizer, dict(val_mlm_acc=round(100 * correct / total, 2))


def _pretrain_lm(steps, desc, batch_size=128):
    """A tiny Qwen2 causal LM, next-token prediction on ShapesWorld captions (text only)."""
    world, tokenizer = ShapesWorld(seed=0), build_tokenizer()
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=128,
                                      intermediate_size=384, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.cls_token_id,
                                      eos_token_id=tokenizer.sep_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    model = transformers.Qwen2ForCausalLM(config)

    def nll(split, indices):  # mean next-token NLL of "[CLS] caption [SEP]", pads ignored
        enc = _caption_batch(world, tokenizer, split, indices)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        return model(**enc, labels=labels).loss

    _train_loop(model, list(model.parameters()), steps, desc,
                lambda step: nll('train', range(step * batch_size, (step + 1) * batch_size)))
    with torch.no_grad():  # perplexity on 1000 val captions
        val_nll = sum(nll('val', range(s, s + 250)).item() for s in range(0, 1000, 250)) / 4
    return model, tokenizer, dict(val_perplexity=round(math.exp(val_nll), 3))


# name -> (pretraining function, default steps: one to three minutes each on 2 CPU cores)
BUILTIN_BACKBONES = {
    'shapes-tiny-vision': (_pretrain_vision, 1000),
    'shapes-tiny-text': (_pretrain_text, 400),
    'shapes-tiny-lm': (_pretrain_lm, 400),
}


# ----------------------------------------------------------------------------- loading

BACKBONE_KINDS = {  # kind -> the Hugging Face model types accepted for it
    'vision': ('vit', 'deit', 'clip', 'clip_vision_model', 'siglip', 'siglip_vision_model'),
    'text': ('bert', 'roberta', 'distilbert', 'mpnet', 'xlm-roberta'),
    'mlm': ('bert', 'roberta', 'distilbert', 'xlm-roberta'),
    'lm': None,  # any causal LM AutoModelForCausalLM knows
}


def unknown_backbone(name, needed, error):
    """The UserError for an unreadable backbone: a folder without the files, or an unknown name."""
    if Path(name).is_dir():
        return UserError(f"backbone folder '{name}' has no {needed} that transformers can read "
                         f"({type(error).__name__}); save the model and its tokenizer there with "
                         f"save_pretrained")
    return UserError(f"unknown backbone '{name}': not a local folder, and not a model that could "
                     f"be fetched from the Hugging Face Hub ({type(error).__name__}). Give a Hub "
                     f"id (e.g. bert-base-uncased), a local path, or one of "
                     f"{', '.join(BUILTIN_BACKBONES)}")


def load_backbone(name, kind, dtype=None):
    """A pretrained backbone by Hugging Face id, local path, or built-in name (shapes-tiny-vision /
    -text / -lm, trained on first use and then loaded through the same from_pretrained path as any
    checkpoint). kind: 'vision' (ViT / DeiT / CLIP / SigLIP vision tower), 'text' (BERT-family
    encoder), 'mlm' (encoder + masked-LM head), 'lm' (causal LM). Returns the HF model."""
    path = builtin_backbone(name) if name.startswith('shapes-tiny') else name
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise unknown_backbone(name, 'config.json', e) from None
    accepted = BACKBONE_KINDS[kind]
    if accepted is not None and config.model_type not in accepted:
        raise UserError(f"backbone '{name}' is a {config.model_type} model, which is not a {kind} "
                        f"backbone (expected one of: {', '.join(accepted)})")
    auto = dict(vision=transformers.AutoModel, text=transformers.AutoModel,
                mlm=transformers.AutoModelForMaskedLM, lm=transformers.AutoModelForCausalLM)[kind]
    towers = dict(clip=transformers.CLIPVisionModel, siglip=transformers.SiglipVisionModel)
    model_class = towers.get(config.model_type, auto) if kind == 'vision' else auto
    return model_class.from_pretrained(path, dtype=dtype or torch.float32)


def load_tokenizer(name):
    """The tokenizer saved with a backbone. The built-ins carry the ShapesWorld word-level
    tokenizer, loaded as the plain fast tokenizer it is: AutoTokenizer would pick the model type's
    class, for the built-in LM's qwen2 a byte-level BPE tokenizer that splits the words wrongly."""
    builtin = name.startswith('shapes-tiny')
    path = builtin_backbone(name) if builtin else name
    tokenizer_class = (transformers.PreTrainedTokenizerFast if builtin
                       else transformers.AutoTokenizer)
    try:
        return tokenizer_class.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise unknown_backbone(name, 'tokenizer files', e) from None


def release_config(name, model_type):
    """--init_from: None for a nanoalign checkpoint (a file, or a path ending in .pt), else the
    config of the released Hugging Face model (folder or Hub id) `name`, of `model_type`."""
    if not name or Path(name).suffix == '.pt' or Path(name).is_file():
        return None
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"--init_from {name}: neither a checkpoint file nor a released model that "
                        f"transformers can read ({type(e).__name__}); give a ckpt.pt, or a folder "
                        f"or Hub id of a {model_type} model") from None
    if config.model_type != model_type:
        raise UserError(f"--init_from {name} is a released {config.model_type} model; this method "
                        f"starts from {model_type} models (or a ckpt.pt of its own)")
    return config


def llava_release(cfg):
    """--init_from DIR, a released LLaVA (folder or Hub id): both backbones of a VLM config become
    DIR (config.json and checkpoints name it; naming DIR as both rebuilds the model), with its
    feature layer and image size -> (cfg, the release's config), or (cfg, None) if none."""
    same = cfg.vision_backbone == cfg.lm_backbone  # no tower is a causal LM: a release
    name = cfg.lm_backbone if same else cfg.init_from
    if not (config := release_config(name, 'llava')):
        return cfg, None
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int) or strategy not in ('default', 'full'):
        raise UserError(f"--init_from {name} reads vision layers {layer} with strategy "
                        f"'{strategy}'; supported: one layer (an int), its CLS dropped ('default') "
                        f"or kept ('full'), as LLaVA-1.5's -2 and 'default'")
    return dataclasses.replace(cfg, vision_backbone=name, lm_backbone=name, vision_layer=layer,
                               image_size=config.vision_config.image_size), config


def llava_from_hf(name, config, vision_dtype=None):
    r"""A released LlavaForConditionalGeneration (`name`, `config` from release_config) taken apart
    -> dict(vision: its CLIP tower, projector: its mlp2x_gelu as nn.Sequential(linear_1, act,
    linear_2), llm: a plain causal LM of text_config made of its language model and lm_head,
    tokenizer, n_special: 1 (CLS dropped, strategy 'default') or 0 ('full')). The released modules
    themselves, not copies: a 7B model is in memory once.
    Layout: LLaVA-1.5 expands '<image>' into config.image_token_id once per patch feature (576)
    and overwrites those embeddings with the projected features in order, positions 0..L-1 along
    the row: 'USER: <image>\n{q} ASSISTANT:' is cal.py's [image_text][n_image slots][prompt], the
    same logits at every position (tested); the prompts are cal.py's, not LLaVA's chat template."""
    try:
        llava = transformers.LlavaForConditionalGeneration.from_pretrained(name,
                                                                           dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise unknown_backbone(name, 'LLaVA weights', e) from None
    with torch.device('meta'):  # an empty shell: its base model and head are the released ones
        llm = transformers.AutoModelForCausalLM.from_config(config.text_config)
    setattr(llm, llm.base_model_prefix, llava.model.language_model)
    llm.lm_head = llava.lm_head
    if any(t.is_meta for t in (*llm.parameters(), *llm.buffers())):  # a part left empty
        raise UserError(f"--init_from {name}: its {type(llm).__name__} has parts besides the base "
                        f"model and lm_head; LLaVAs on Llama-, Mistral- or Qwen2-like LMs work")
    hf = llava.model.multi_modal_projector
    return dict(vision=llava.model.vision_tower.to(vision_dtype or torch.float32), llm=llm,
                projector=nn.Sequential(hf.linear_1, hf.act, hf.linear_2),
                tokenizer=load_tokenizer(name),
                n_special=int(config.vision_feature_select_strategy == 'default'))


# ------------------------------------------------------------------------- paper-scale stand-ins
# The presets' backbones with their published architectures and random weights, and a COCO-layout
# folder of ShapesWorld scenes, so every --data coco preset runs end to end offline (and can be
# timed on a GPU) before anyone downloads a checkpoint. The tokenizer is the built-in word-level one
# padded to the real vocabulary size, so embeddings and output layers have their real shapes.
_B16 = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
STAND_INS = {  # folder (the Hub id's last part) -> (HF model class, config class, config)
    'deit-base-patch16-224': ('DeiTModel', 'DeiTConfig', dict(_B16, image_size=224, patch_size=16)),
    'vit-base-patch16-224-in21k': ('ViTModel', 'ViTConfig', dict(_B16, image_size=224,
                                                                 patch_size=16)),
    'clip-vit-base-patch32': ('CLIPVisionModel', 'CLIPVisionConfig',
                              dict(_B16, image_size=224, patch_size=32, hidden_act='quick_gelu')),
    'clip-vit-large-patch14-336': ('CLIPVisionModel', 'CLIPVisionConfig',
                                   dict(hidden_size=1024, num_hidden_layers=24,
                                        num_attention_heads=16, intermediate_size=4096,
                                        image_size=336, patch_size=14, hidden_act='quick_gelu')),
    'bert-base-uncased': ('BertForMaskedLM', 'BertConfig', dict(_B16, vocab_size=30522)),
    'all-MiniLM-L6-v2': ('BertModel', 'BertConfig',
                         dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                              intermediate_size=1536, vocab_size=30522)),
    'Qwen2.5-0.5B-Instruct': ('Qwen2ForCausalLM', 'Qwen2Config',
                              dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                   max_position_embeddings=32768, tie_word_embeddings=True)),
    'Qwen2.5-1.5B-Instruct': ('Qwen2ForCausalLM', 'Qwen2Config',
                              dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   max_position_embeddings=32768, tie_word_embeddings=True)),
}
# --tiny: the same model types, depths and image sizes, 32 wide
TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_key_value_heads=2)


def write_stand_ins(out, tiny=False, images=(256, 32, 32), image_size=384):
    """Random-initialised paper-scale backbones in out/<name> (STAND_INS; tiny: TINY widths and the
    built-in vocabulary) and a Karpathy-format COCO folder in out/coco: `images` ShapesWorld scenes
    for train / val / test as JPEGs, 5 captions each. -> out."""
    out = Path(out)
    for name, (model_class, config_class, config) in STAND_INS.items():
        if (out / name / 'config.json').is_file():
            continue
        config = dict(config, **{k: v for k, v in TINY.items() if tiny and k in config})
        tokenizer = build_tokenizer(0 if tiny else config.get('vocab_size', 0))
        if 'vocab_size' in config:
            config['vocab_size'] = len(tokenizer)
            tokenizer.save_pretrained(out / name)
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
        model.save_pretrained(out / name)
        print(f"{out / name}: {model_class}, {count_params(model) / 1e6:.1f}M parameters")
    world, root = ShapesWorld(image_size=image_size), out / 'coco'
    for split, n in zip(('train', 'val', 'test'), images):
        folder = 'train2014' if split == 'train' else 'val2014'
        (root / folder).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            path = f"{folder}/COCO_{folder}_{split}{i:06d}.jpg"
            world.image(split, i).save(root / path, quality=95)
            captions = world.captions(split, i)
            rows += ([dict(image=path, caption=c, image_id=f'{split}{i}') for c in captions]
                     if split == 'train' else [dict(image=path, caption=captions)])
        (root / f'coco_karpathy_{split}.json').write_text(json.dumps(rows))
    print(f"{root}: {' / '.join(map(str, images))} train / val / test images")
    return out


if __name__ == '__main__':
    import sys
    if sys.argv[1:2] == ['--paper_scale'] and len(sys.argv) in (3, 4):
        write_stand_ins(sys.argv[2], tiny=sys.argv[3:] == ['--tiny'])
    else:
        for backbone in BUILTIN_BACKBONES:
            print(backbone, (Path(builtin_backbone(backbone)) / 'quality.json').read_text())
