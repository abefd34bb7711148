"""
blip_gated_sparse.py — a BLIP captioner with soft token gating and post-computation top-k sparse
attention.

Papers: BLIP, "Bootstrapping Language-Image Pre-training", Li et al., ICML 2022, arXiv 2201.12086
        (code: salesforce/BLIP, the captioner `BLIP_Decoder`); Explicit Sparse Transformer,
        Zhao et al. 2019, arXiv 1912.11637 (top-k masking before the softmax).
        Decisions: specs/blip_gated_sparse.md.

The idea in three sentences. BLIP captions an image with a BERT-style decoder whose every layer runs
causal self-attention over the caption so far, then cross-attention to the image tokens, then an
FFN. Soft token gating lets each caption token scale how loudly it is heard: a small MLP maps its
hidden state to g in (0, 2), and every query's attention weight on that token is multiplied by g
(log g added to the scores: a soft mask; g = 1 at the start, so training starts from plain
BLIP). Post-computation top-k sparsity lets each query keep only its
ceil((1 - s) * n) highest scores among its n visible keys and sends the rest to the softmax's floor:
the score matrix is still computed in full, only the mixing is sparse.

    python blip_gated_sparse.py                 # ShapesWorld, gate kv + sparsity 0.7, CPU, minutes
    python blip_gated_sparse.py --gate off --sparsity 0    # plain BLIP (the ablation's dense row)
    python blip_gated_sparse.py --image_input latents      # VAE latents instead of pixels
    python blip_gated_sparse.py --data coco --data_root /data/coco   # ViT-B/16 + BERT-base, 384 px
    python blip_gated_sparse.py --data coco --data_root /data/coco \
        --init_from Salesforce/blip-image-captioning-base     # from the released captioner
    python blip_gated_sparse.py --data json --ann_file caps.json --image_input latents
                                                           # rows {latent, caption}
"""
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import backbones
import common
from data import (ShapesWorld, UserError, build_dataset, collate, eval_loader, read_image,
                  train_batches)

METHOD = 'blip_gated_sparse'

# ----------------------------------------------------------------------------- config & presets

@dataclass
class Config(common.RunConfig):
    vision_backbone: str = 'shapes-tiny-vision'  # ViT / DeiT / CLIP vision checkpoint
                                                 # (--image_input pixels)
    text_backbone: str = 'shapes-tiny-text'      # BERT checkpoint the decoder starts from
                                                 # (cross-attention is new)
    image_input: str = 'pixels'     # pixels (a ViT over the image)
                                    # | latents (precomputed VAE latents, 4 x h x w)
    latent_layers: int = 2          # pre-LN transformer layers over the latent patches
    latent_scale: float = 1.0       # stored latents are multiplied by this
                                    # (SDXL VAE: 0.13025 for raw encoder means)
    image_size: int = 64            # pixels (latents: the stand-in's grid is image_size / 8)
    max_len: int = 32               # prompt + caption tokens in training
    prompt: str = 'a picture of '   # BLIP's captioning prompt: prepended,
                                    # excluded from the loss and the output
    label_smoothing: float = 0.1    # BLIP's captioning loss
    gate: str = 'kv'                # kv (each token's self-attention weight x g: log g added)
                                    # | hidden | off
    sparsity: float = 0.7           # fraction of each query's visible keys dropped
                                    # after the scores (0 = dense)
    sparse_in: str = 'self,cross'   # which decoder attentions are sparse: self, cross or both
    num_beams: int = 3              # beam search width at evaluation (1 = greedy)
    max_new_tokens: int = 16        # caption tokens generated at most, [SEP] included
                                    # (BLIP: max_length 20 - prompt 4)
    min_new_tokens: int = 1         # [SEP] is forbidden before this many tokens
                                    # (BLIP: min_length 5 - prompt 4)
    kv_cache: bool = True           # decode with cached keys and values
                                    # (False: the whole prefix again every step)
    eval_images: int = 0            # test images captioned (0 = all: 1,000 on ShapesWorld)
    val_images: int = 200           # val images captioned at every --eval_every
                                    # (the convergence curve)


REAL = dict(vision_backbone='google/vit-base-patch16-224-in21k', text_backbone='bert-base-uncased',
            image_size=384, max_len=40, batch_size=32, lr=1e-5, weight_decay=0.05, warmup_steps=0,
            max_steps=11_000, eval_every=2000, val_images=1000, log_every=50,
            grad_checkpointing=True,  # BLIP caption_coco.yaml: 8 x 32, 5 epochs
            latent_scale=0.13025)  # --image_input latents: files of raw SDXL-VAE latents
PRESETS = {  # shapes: 1,000 steps, so that a first run, backbone builds included, takes under 10
    # minutes on a 2-core CPU; the 1,200-step ablation's pixel rows reached 95% of their best val
    # CIDEr at step 467-600 on average (README)
    'shapes': dict(batch_size=64, max_steps=1000, lr=5e-4, warmup_steps=100, weight_decay=0.05,
                   eval_every=100, log_every=20),
    'coco': REAL, 'flickr30k': REAL, 'json': REAL,
}


# what a checkpoint must match
SHAPE_FLAGS = '--gate / --image_input / --latent_layers or the backbones'


def sparse_places(cfg):
    return [p.strip() for p in cfg.sparse_in.split(',') if p.strip()]


def check_config(cfg):
    choices = dict(image_input=('pixels', 'latents'), gate=('kv', 'hidden', 'off'))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} '{getattr(cfg, name)}' is not one of {', '.join(allowed)}")
    if not 0 <= cfg.sparsity < 1:
        raise UserError(f"--sparsity {cfg.sparsity} must be in [0, 1): "
                        f"the fraction of visible keys dropped")
    if not sparse_places(cfg) or not set(sparse_places(cfg)) <= {'self', 'cross'}:
        raise UserError(f"--sparse_in '{cfg.sparse_in}' must name self, cross or both "
                        f"(comma-separated)")
    if (cfg.num_beams < 1 or not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens
            or cfg.max_new_tokens < 1):
        raise UserError(f"--num_beams ({cfg.num_beams}) and --max_new_tokens "
                        f"({cfg.max_new_tokens}) must be >= 1, and 0 <= --min_new_tokens "
                        f"({cfg.min_new_tokens}) <= --max_new_tokens")


# ----------------------------------------------------------------------------- the two techniques

class TokenGate(nn.Module):
    """Soft token gating: g_t = 2 * sigmoid(W2 GELU(W1 h_t)) in (0, 2), one scalar per token,
    computed from the token's own hidden state (position-wise, so causal-safe). W2 and its bias
    start at zero: g = 1 exactly, and the gated model starts as plain BLIP. Padding gets g = 0."""

    def __init__(self, dim):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, dim // 2), nn.Linear(dim // 2, 1)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, h, mask):  # h (B, L, D), mask (B, L) 0/1 -> g (B, L)
        return 2 * torch.sigmoid(self.w2(F.gelu(self.w1(h)))).squeeze(-1) * mask.to(h.dtype)


class TopK:
    """Post-computation top-k, applied by GatedSparseAttention after the causal and padding masks:
    query i keeps its k_i = max(1, ceil((1 - sparsity) * n_i)) highest scores among its n_i visible
    keys (ties at the k_i-th score are all kept); every other score becomes finfo.min (never -1e10,
    which overflows in fp16), so the softmax gives it weight 0. k_i depends only on what query i can
    see, so a cached decoding step keeps the same keys as teacher forcing. With `counting` on it
    tallies kept / visible connections (attn_kept_frac) over the queries that `query_mask` (B, L)
    marks as real tokens (a pad's own row is no connection of the caption)."""

    def __init__(self, sparsity):
        self.sparsity, self.counting, self.query_mask = sparsity, False, None
        self.kept, self.visible = 0, 0

    def keep_count(self, n):  # visible keys (tensor) -> kept keys max(1, ceil((1 - sparsity) n))
        # (1 - 0.7) * 10 is 3.0000000000000004: round before the ceil
        return ((1 - self.sparsity) * n.double() * 1e9).round().div(1e9).ceil().clamp(min=1).long()

    def __call__(self, scores, mask):  # scores (B, H, Lq, Lk) masked; mask additive or None
        low, n_keys = torch.finfo(scores.dtype).min, scores.shape[-1]
        k_max = int(self.keep_count(torch.tensor(n_keys)))  # the most any query keeps
        with torch.no_grad():  # the threshold carries no gradient
            if mask is None:  # every key visible: one k for all queries
                visible = torch.ones((), dtype=torch.bool, device=scores.device)
                tau = scores.topk(k_max, -1).values[..., -1:]                     # (B, H, Lq, 1)
            else:
                visible = mask > torch.finfo(mask.dtype).min / 2                 # (B, 1, Lq, Lk)
                k = self.keep_count(visible.sum(-1, keepdim=True))               # (B, 1, Lq, 1)
                # a partial sort to k_max, not a full sort of the row: the k-th largest visible
                top = scores.masked_fill(~visible, -math.inf).topk(k_max, -1).values
                tau = top.gather(-1, (k - 1).expand(*scores.shape[:-1], 1))      # (B, H, Lq, 1)
        keep = visible & (scores >= tau)                                         # ties all kept
        if self.counting:
            rows = self.query_mask.bool()[:, None, :, None]                      # (B, 1, Lq, 1)
            self.kept += (keep & rows).sum().item()
            self.visible += (visible.expand_as(scores) & rows).sum().item()
        return scores.masked_fill(~keep, low)


class GatedSparseAttention(backbones.Attention):
    """The decoder's multi-head attention with both techniques on one screen (the parameters are
    those of backbones.Attention, so BERT's weights load into it by the same key map):
      1. soft token gating as a soft mask: log g_j is added to every query's score for key j, so
         key j's weight is proportional to g_j * exp(s_ij); a token with g < 1 is heard less by
         every later token whatever the sign of its score (scaling the key instead would raise
         the weight of a key whose score is negative), and g = 1 changes nothing;
      2. post-computation top-k: the full score matrix is computed and masked, then each query
         keeps only its top-k visible scores (self.topk, a TopK; None = dense, and the fused SDPA
         kernel runs, the gate inside its additive mask).
    `past` holds the keys, values and log-gates of the tokens decoded so far: a cached decoding
    step attends to them and to its own, and gets teacher forcing's result.
    `context_kv` holds the context's keys and values projected already: the image is the same at
    every decoding step, so its keys and values are projected once and reused."""
    topk = None

    def forward(self, x, context=None, mask=None, return_attn=False, gate=None, past=None,
                context_kv=None):
        """x (B, Lq, D), context (B, Lk, kv_dim) or None, mask additive (B, 1, Lq, Lk),
        gate (B, Lq) or None, context_kv (k, v) each (B, H, Lk, Dh) or None (project context)
        -> out (B, Lq, D), probs (B, H, Lq, Lk) or None, the cache: (k, v) each
        (B, H, past + Lq, Dh), and the log-gates (B, past + Lq) when gated (cross-attention:
        the context's (k, v), to pass back as context_kv)."""
        context = x if context is None else context
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        q = split(self.q(x))                                                     # (B, H, Lq, Dh)
        if context_kv is None:
            k, v = split(self.k(context)), split(self.v(context))                # (B, H, Lk, Dh)
        else:  # projected at an earlier decoding step
            k, v = context_kv
        floor, tiny = torch.finfo(q.dtype).min, torch.finfo(q.dtype).tiny
        # (B, Lq); a pad's g = 0 is lifted to tiny (its key is masked already): no log 0 -> nan
        log_gate = None if gate is None else torch.log(gate.to(q.dtype).clamp(min=tiny))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            log_gate = None if gate is None else torch.cat([past[2], log_gate], 1)
        # summed masks can reach -inf: clamp, so a row with no visible key stays finite
        if mask is not None:
            mask = mask.to(q.dtype).clamp(min=floor)
        # the gate as a soft mask: score_ij + log g_j
        bias = mask if gate is None else (mask + log_gate[:, None, None, :]).clamp(min=floor)
        p_drop = self.dropout if self.training else 0.0
        probs = None
        if self.topk is None and not return_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p_drop)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])             # (B, H, Lq, Lk)
            scores = scores if bias is None else scores + bias
            # every score outside a query's top k goes to the softmax's floor (what a query can
            # see comes from the mask; the gate only moves scores)
            if self.topk is not None:
                scores = self.topk(scores, mask)
            probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
            out = F.dropout(probs, p_drop, self.training) @ v                     # (B, H, Lq, Dh)
        cache = (k, v) if gate is None else (k, v, log_gate)
        return self.proj(out.transpose(1, 2).flatten(2)), probs, cache


class DecoderLayer(backbones.BertLayer):
    """BLIP's decoder layer: a post-LN BERT layer built with GatedSparseAttention: causal
    self-attention over the caption (gated as a soft mask, cached when decoding)
    -> cross-attention to the image tokens -> FFN."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, attention=GatedSparseAttention, **kwargs)

    def forward(self, x, mask, image, gate=None, past=None, return_attn=False, image_kv=None):
        """x (B, L, D), mask (B, 1, L, past + L), image (B, M, Dv), image_kv: the image's
        cross-attention (k, v) each (B, H, M, Dh) from an earlier call, or None (projected here)
        -> x, self-attention probs, (k, v), image_kv."""
        h, probs, kv = self.self_attn(x, mask=mask, return_attn=return_attn, gate=gate, past=past)
        x = self.norm1(x + self.drop(h))
        # every image token is visible
        h, _, image_kv = self.cross_attn(x, image, context_kv=image_kv)
        x = self.norm_cross(x + self.drop(h))
        return self.norm2(x + self.drop(self.mlp(x))), probs, kv, image_kv

# ----------------------------------------------------------------------------- model

def sincos_2d(h, w, dim):
    """Fixed 2-D sin-cos position embedding (MAE's): half the channels encode the row, half the
    column. -> (h*w, D)"""
    quarter = dim // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter) / quarter)                     # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    parts = [f(pos.flatten()[:, None].float() * freq)
             for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    out = torch.cat(parts, 1)                                                    # (h*w, 4 * (D/4))
    return F.pad(out, (0, dim - out.shape[1]))


class LatentEncoder(nn.Module):
    """VAE latents (B, 4, h, w) -> image tokens (B, ceil(h/2) * ceil(w/2), D): 2x2 patches
    (Conv2d(4, D, 2, 2)), 2-D sin-cos positions of the actual grid (any h, w), pre-LN transformer
    layers, final LN."""

    def __init__(self, dim, depth, heads, channels=4):
        super().__init__()
        self.channels = channels
        self.patch = nn.Conv2d(channels, dim, 2, stride=2)
        self.blocks = nn.ModuleList(backbones.ViTBlock(dim, heads, 4 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.channels or min(z.shape[2:]) < 1:
            raise UserError(f"latent input must be (batch, {self.channels}, h, w) VAE latents; "
                            f"got a tensor of shape {tuple(z.shape)}: store each latent as a "
                            f"({self.channels}, h, w) array")
        # an odd side gets a zero row/column
        z = F.pad(z, (0, z.shape[3] % 2, 0, z.shape[2] % 2))
        x = self.patch(z)                                                        # (B, D, h', w')
        x = x.flatten(2).transpose(1, 2) + sincos_2d(*x.shape[2:], x.shape[1]).to(x)  # (B, h'w', D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def grow_vocab(embeddings, lm_head, vocab_size):
    """Add rows for new tokens to the word embeddings (HF's init: normal, std 0.02) and re-tie the
    LM head."""
    old = embeddings.word
    word = nn.Embedding(vocab_size, old.embedding_dim, padding_idx=old.padding_idx)
    nn.init.normal_(word.weight, std=0.02)
    word.weight.data[:old.num_embeddings] = old.weight.data
    embeddings.word = word
    decoder = nn.Linear(old.embedding_dim, vocab_size)
    nn.init.zeros_(decoder.bias)
    decoder.bias.data[:old.num_embeddings] = lm_head.decoder.bias.data
    decoder.weight = word.weight                                                 # tied, as before
    lm_head.decoder = decoder


class Decoder(nn.Module):
    """BLIP's text decoder: BERT layers (post-LN) with causal self-attention -> cross-attention to
    the image tokens -> FFN, the BERT LM head tied to the word embeddings. Gates (one per layer)
    and the shared TopK are attached here. forward() serves teacher forcing and cached decoding
    alike."""

    def __init__(self, cfg, text_hf, image_dim, vocab_size):
        super().__init__()
        n = text_hf.config.num_hidden_layers
        self.embeddings, self.layers, self.lm_head, _ = backbones.bert_from_hf(
            text_hf, cross_layers=range(n), cross_dim=image_dim, layer_class=DecoderLayer)
        # the tokenizer gained [DEC] (BERT has no BOS)
        if vocab_size > self.embeddings.word.num_embeddings:
            grow_vocab(self.embeddings, self.lm_head, vocab_size)
        self.gate = cfg.gate
        dim = text_hf.config.hidden_size
        self.gates = nn.ModuleList(TokenGate(dim) for _ in range(n)) if cfg.gate != 'off' else None
        self.topk = TopK(cfg.sparsity)
        if cfg.sparsity > 0:  # at 0 no top-k: the fused SDPA kernel runs, as in plain BLIP
            for layer in self.layers:
                layer.self_attn.topk = self.topk if 'self' in sparse_places(cfg) else None
                layer.cross_attn.topk = self.topk if 'cross' in sparse_places(cfg) else None
        # the gates of the last forward, (B, L) per layer (evaluation and the PNG read them)
        self.last_gates = []

    def embed(self, ids, past):
        # (B, L) -> (B, L, D): BERT's embeddings at positions past .. past + L - 1
        e = self.embeddings
        positions = torch.arange(past, past + ids.shape[1], device=ids.device)
        return e.drop(e.norm(e.word(ids) + e.position(positions) + e.token_type.weight[0]))

    def forward(self, ids, image, mask=None, cache=None, return_attn=False):
        """ids (B, L), image tokens (B, M, Dv), mask (B, L) 0/1 -> logits (B, L, V)
        [, self-attention probs per layer]. cache: a list (empty at the start) that keeps, per
        layer, (k, v[, log_gate], image_k, image_v): the keys and values so far
        (B, H, past + L, Dh), their log-gates (B, past + L) under --gate kv, and the
        cross-attention keys and values of the image (B, H, M, Dh), projected on the first call
        only (the image must be the same at every call); called again with the next tokens it
        continues the sequence (no padding then), giving teacher forcing's logits."""
        past = cache[0][0].shape[2] if cache else 0
        B, L = ids.shape
        mask = torch.ones_like(ids) if mask is None else mask
        past_keys = torch.ones(B, past, dtype=mask.dtype, device=ids.device)
        keys = torch.cat([past_keys, mask], 1)                                   # (B, past + L)
        padding = backbones.padding_mask(keys)                                   # (B, 1, 1, past+L)
        causal = backbones.causal_mask(past + L, ids.device)[past:]              # (L, past + L)
        attn_mask = padding + causal                                             # (B, 1, L, past+L)
        x = self.embed(ids, past)                                                # (B, L, D)
        self.last_gates, attns = [], []
        for i, layer in enumerate(self.layers):
            # (B, L) gate of each token
            g = self.gates[i](x, mask) if self.gates is not None else None
            # the state entering the layer is scaled (not cancelled: LN(gx + attn(gx)))
            if self.gate == 'hidden':
                x = x * g[..., None]
            # keys decoded so far, and the image's keys and values (None: not projected yet)
            past_kv, image_kv = None, None
            if cache is not None and len(cache) > i:  # (k, v[, log-gate], image k, image v)
                past_kv, image_kv = cache[i][:-2], cache[i][-2:]
            kv_gate = g if self.gate == 'kv' else None
            x, probs, kv, image_kv = layer(x, attn_mask, image, kv_gate, past_kv, return_attn,
                                           image_kv)
            if cache is not None:
                # contiguous once (a no-op later): strided, the image's keys and values would be
                # copied by every step's attention matmul
                image_kv = tuple(t.contiguous() for t in image_kv)
                cache[i:i + 1] = [(*kv, *image_kv)]  # append, or replace layer i's
            self.last_gates.append(g)
            attns.append(probs)
        logits = self.lm_head(x)                                                 # (B, L, V)
        return (logits, attns) if return_attn else logits


def decoder_tokenizer(name):
    """The backbone's tokenizer with a decoder BOS: the built-in has [DEC]; BERT's gets it added,
    as BLIP does."""
    tokenizer = backbones.load_tokenizer(name)
    if tokenizer.bos_token_id is None or tokenizer.bos_token_id == tokenizer.cls_token_id:
        tokenizer.add_special_tokens({'bos_token': '[DEC]'})
    return tokenizer


def released_captioner(name):
    """A released Hugging Face BLIP captioner (BlipForConditionalGeneration, a folder or Hub id such
    as Salesforce/blip-image-captioning-base) -> (its ViT, its text decoder): Captioner maps them
    by the key maps of a ViT and a BERT, the decoder's cross-attention included, so with
    --gate off --sparsity 0 the captioner is the released model (its gates, new, start at 1)."""
    blip = transformers.BlipForConditionalGeneration.from_pretrained(name, dtype=torch.float32)
    return blip.vision_model, blip.text_decoder


class Captioner(nn.Module):
    """Image encoder (a ViT over pixels, or the latent encoder) + the gated, sparse decoder."""

    def __init__(self, cfg, tokenizer, vision_hf, text_hf):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        if cfg.image_input == 'pixels':
            self.image_encoder = backbones.vit_from_hf(vision_hf, cfg.image_size)
            self.image_encoder.grad_checkpointing = cfg.grad_checkpointing
            image_dim = vision_hf.config.hidden_size
        else:
            image_dim = text_hf.config.hidden_size
            heads = text_hf.config.num_attention_heads
            self.image_encoder = LatentEncoder(image_dim, cfg.latent_layers, heads)
        self.decoder = Decoder(cfg, text_hf, image_dim, len(tokenizer))
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.sep_token_id
        # BOS + prompt words (the [SEP] is not prompt)
        self.n_prompt = len(tokenizer(cfg.prompt).input_ids) - 1

    def encode_image(self, images):  # pixels (B, 3, H, W) or latents (B, 4, h, w) -> (B, M, Dv)
        if self.cfg.image_input == 'latents':
            images = images * self.cfg.latent_scale
        return self.image_encoder(images)

    def tokenize(self, captions):
        """Captions -> ids (B, L) = [DEC] prompt caption [SEP] [pads], mask (B, L), labels (B, L):
        -100 on the BOS, the prompt and the pads, so the loss covers the caption and its [SEP]
        (which teaches stopping)."""
        texts = [self.cfg.prompt + c for c in captions]
        enc = self.tokenizer(texts, padding='longest', truncation=True, max_length=self.cfg.max_len,
                             return_tensors='pt')
        ids, mask = enc.input_ids.clone(), enc.attention_mask
        ids[:, 0] = self.bos_id                                                  # [CLS] -> [DEC]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :self.n_prompt] = -100
        return ids, mask, labels

    def forward(self, images, ids, mask, labels):  # -> mean next-token CE with label smoothing
        logits = self.decoder(ids, self.encode_image(images), mask)             # (B, L, V)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def generate(self, image, num_beams=None, kv_cache=None):
        """Beam search (greedy at num_beams 1) from image tokens (B, M, Dv) -> B captions without
        the prompt. A hypothesis ends at [SEP] (forbidden before min_new_tokens) and is scored by
        its summed log-probs over its new tokens (length penalty 1); a caption is done once it has
        num_beams finished hypotheses (HF's early_stopping=True), and the best of its finished and
        surviving hypotheses is returned."""
        cfg, K = self.cfg, num_beams or self.cfg.num_beams
        kv_cache = cfg.kv_cache if kv_cache is None else kv_cache
        B, device = len(image), image.device
        prompt = self.tokenize([''])[0][:, :self.n_prompt].to(device).expand(B * K, -1)  # (B*K, P)
        image, cache = image.repeat_interleave(K, 0), [] if kv_cache else None
        logits = self.decoder(prompt, image, cache=cache)[:, -1]                 # (B*K, V)
        scores = torch.full((B, K), -math.inf, device=device)
        scores[:, 0] = 0  # all beams start as one
        tokens = torch.zeros(B * K, 0, dtype=torch.long, device=device)
        finished = [[] for _ in range(B)]  # (normalised score, token list)
        for t in range(cfg.max_new_tokens):
            logp = F.log_softmax(logits.float(), -1)                             # (B*K, V)
            if t < cfg.min_new_tokens:
                logp[:, self.eos_id] = -math.inf
            V = logp.shape[1]
            # (B, 2K) best continuations: from which beam, which token
            top, index = (scores.view(-1, 1) + logp).view(B, K * V).topk(2 * K, 1)
            beam, token = index // V, index % V
            is_eos = token == self.eos_id
            # EOS among the K best: a finished hypothesis
            for b, j in (is_eos[:, :K]).nonzero().tolist():
                if len(finished[b]) < K:
                    normalised = top[b, j].item() / (t + 1)
                    finished[b].append((normalised, tokens[b * K + beam[b, j]].tolist()))
            if all(len(f) >= K for f in finished):
                break
            # the K best non-EOS continuations survive (each beam adds at most one EOS, so 2K hold
            # at least K others)
            eos_last = is_eos.long() * 2 * K + torch.arange(2 * K, device=device)  # (B, 2K)
            alive = eos_last.argsort(1)[:, :K]                                   # (B, K)
            first_row = torch.arange(B, device=device)[:, None] * K              # (B, 1)
            source = (first_row + beam.gather(1, alive)).flatten()               # (B*K,) rows
            scores, new = top.gather(1, alive), token.gather(1, alive).flatten()  # (B, K), (B*K,)
            tokens = torch.cat([tokens[source], new[:, None]], 1)                # (B*K, t+1)
            if kv_cache:
                # the image's keys and values (the last two) need no reordering: source picks
                # rows within each image's own K rows, and those all hold the same image
                cache[:] = [(*(t[source] for t in layer[:-2]), *layer[-2:]) for layer in cache]
                logits = self.decoder(new[:, None], image, cache=cache)[:, -1]
            else:
                logits = self.decoder(torch.cat([prompt, tokens], 1), image)[:, -1]
        captions = []
        for b in range(B):
            pool = list(finished[b])
            if len(pool) < K:  # not done at max_new_tokens: the surviving beams compete too
                pool += [(scores[b, j].item() / tokens.shape[1], tokens[b * K + j].tolist())
                         for j in range(K)]
            best_tokens = max(pool, key=lambda p: p[0])[1]
            captions.append(self.tokenizer.decode(best_tokens, skip_special_tokens=True))
        return captions

# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def draw(model, cfg, raw, caption, device, path):
    """PNG: test image 0 beside its generated caption, each token shaded by its gate (mean over
    layers, / 2 so that 1 = no change sits mid-scale), then the self-attention of the caption's
    last token in the last layer, dense and after top-k (marked: the keys that every head
    dropped). Latents are shown by their first three channels (the ShapesWorld stand-in's block
    means of R, G, B; a false-colour view of a real VAE latent)."""
    decoder = model.decoder
    ids, mask, _ = model.tokenize([caption])
    ids, mask = ids.to(device), mask.to(device)
    image = model.encode_image(raw[None].to(device))
    words = model.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    _, sparse = decoder(ids, image, mask, return_attn=True)
    rows = []
    if decoder.gates is not None:
        gate = torch.stack(decoder.last_gates).mean(0)[0]                       # (L,)
        rows.append((f'gate / 2 (--gate {cfg.gate}, mean over layers)',
                     [(w, g / 2, False) for w, g in zip(words, gate.tolist())]))
    topks = [(a, a.topk) for layer in decoder.layers for a in (layer.self_attn, layer.cross_attn)]
    for attention, _ in topks:  # the same decoder without top-k: the dense attention
        attention.topk = None
    _, dense = decoder(ids, image, mask, return_attn=True)
    for attention, topk in topks:
        attention.topk = topk
    last = len(words) - 1
    dense_row = dense[-1][0].mean(0)[last]                                     # (L,) heads averaged
    sparse_row = sparse[-1][0].mean(0)[last] if sparse[-1] is not None else dense_row
    peak = dense_row.max().item()
    rows.append((f"self-attention of '{words[last]}', last layer, dense (/ row max)",
                 [(w, p / peak, False) for w, p in zip(words, dense_row.tolist())]))
    where = 'self' in sparse_places(cfg) and cfg.sparsity > 0
    label = (f'after top-k, sparsity {cfg.sparsity} (marked: dropped by every head)' if where
             else 'top-k is off in self-attention (--sparsity 0 or --sparse_in cross): '
                  'the same as dense')
    entries = [(w, s / peak, d > 0 and s == 0)
               for w, d, s in zip(words, dense_row.tolist(), sparse_row.tolist())]
    rows.append((label, entries))
    title = f'{METHOD}: test image 0 (--image_input {cfg.image_input})'
    common.render_tokens(raw[:3], rows, str(path), title=title, mark_label='dropped by top-k')


@torch.no_grad()
def evaluate(model, cfg, split, run, world, png=None):
    """Beam-search captions of the split's images against their references (bleu4 meteor rouge_l
    cider); on test, the same decoder with the image tokens zeroed too (blind_cider). One
    teacher-forced pass over each image's first reference gives attn_kept_frac (kept / visible
    attention connections) and the gate statistics."""
    model.eval()
    # the blind control is a second beam search: the per-eval val curve skips it
    blind = split == 'test'
    n_images = cfg.eval_images if split == 'test' else cfg.val_images
    dataset = build_dataset(cfg, split, world, image_input=cfg.image_input, max_images=n_images)
    collate_fn = partial(collate, tokenizer=model.tokenizer, max_len=cfg.max_len)
    predictions, blind_predictions, references, gates = {}, {}, {}, []
    topk = model.decoder.topk
    topk.kept = topk.visible = 0
    for batch in eval_loader(dataset, cfg.batch_size, collate_fn):
        image = model.encode_image(batch['image'].to(run.device))               # (B, M, Dv)
        ids = batch['image_id'].tolist()
        predictions.update(zip(ids, model.generate(image)))
        if blind:
            blind_predictions.update(zip(ids, model.generate(torch.zeros_like(image))))
        references.update(zip(ids, batch['captions']))
        tokens, mask, _ = model.tokenize(batch['caption'])  # each image's first caption, cleaned
        topk.counting, topk.query_mask = True, mask.to(run.device)
        model.decoder(tokens.to(run.device), image, mask.to(run.device))
        topk.counting, topk.query_mask = False, None
        if model.decoder.gates is not None:
            gates += [g[mask.bool().to(g.device)] for g in model.decoder.last_gates]
    metrics = common.caption_metrics(predictions, references)
    if blind:
        metrics['blind_cider'] = common.caption_metrics(blind_predictions, references)['cider']
    # dense: everything is kept
    metrics['attn_kept_frac'] = topk.kept / topk.visible if topk.visible else 1.0
    gates = torch.cat(gates) if gates else torch.ones(1)
    metrics.update(gate_mean=gates.mean().item(),
                   gate_std=gates.std().item() if len(gates) > 1 else 0.0)
    if png:
        draw(model, cfg, dataset[0]['image'], predictions[dataset[0]['image_id']], run.device, png)
    model.train()
    return metrics


def steps_to_fraction(log_path, fraction):
    """First eval step whose val CIDEr reaches `fraction` of the run's best (from log.jsonl, so a
    resumed run counts its evals before the resume too); None without an eval or with a best
    of 0."""
    log_rows = map(json.loads, Path(log_path).read_text().splitlines())
    curve = [(row['step'], row['val_cider']) for row in log_rows if 'val_cider' in row]
    best = max((c for _, c in curve), default=0)
    return next((s for s, c in curve if c >= fraction * best), None) if best > 0 else None


@torch.no_grad()
def predict(model, cfg, run):
    """--predict: the beam-search caption of each image file (.pt / .npy latents for a latent
    model), one block per file."""
    model.eval()
    channels = 4 if cfg.image_input == 'latents' else 3
    for path in cfg.predict:
        is_latent = Path(path).suffix in ('.pt', '.npy')
        image = read_image(path, cfg.image_size, latents=is_latent)              # (C, H, W)
        if image.dim() != 3 or image.shape[0] != channels:
            raise UserError(f"{path} gives a {tuple(image.shape)} input, but this checkpoint "
                            f"takes --image_input {cfg.image_input}: give "
                            f"{'.pt / .npy latents (4, h, w)' if channels == 4 else 'image files'}")
        caption = model.generate(model.encode_image(image[None].to(run.device)))[0]
        print(f"{path}\n  caption: {caption}")


# ----------------------------------------------------------------------------- training loop

def caption_loss(captioner, batch, device):
    """One micro-batch's loss: the captions tokenised (prompt, caption, [SEP]) and the model's
    smoothed CE. captioner: the model, or its DDP / compiled wrapper."""
    ids, mask, labels = (t.to(device) for t in common.unwrap(captioner).tokenize(batch['caption']))
    return captioner(batch['image'].to(device, non_blocking=True), ids, mask, labels)


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv, stem=METHOD)
    check_config(cfg)
    run = common.setup(cfg)
    out = Path(cfg.out_dir)
    world = ShapesWorld(seed=0, image_size=cfg.image_size) if cfg.data == 'shapes' else None
    if not cfg.predict:  # fail early on a bad path or the wrong row kind
        build_dataset(cfg, 'test', world, image_input=cfg.image_input, max_images=1)
    # --init_from a released BLIP: its weights and tokenizer replace the backbones
    release = None if cfg.predict else backbones.release_config(cfg.init_from, 'blip')
    tokenizer = decoder_tokenizer(cfg.init_from if release else cfg.text_backbone)
    if release:
        vision, text = released_captioner(cfg.init_from)
    else:
        vision = (backbones.load_backbone(cfg.vision_backbone, 'vision')
                  if cfg.image_input == 'pixels' else None)
        text = backbones.load_backbone(cfg.text_backbone, 'mlm')
    model = Captioner(cfg, tokenizer, vision, text).to(run.device)
    if run.is_main:
        gate_params = backbones.count_params(model.decoder.gates or nn.Module())
        print(f"{METHOD}: {backbones.count_params(model, True) / 1e6:.1f}M trainable parameters "
              f"(gates: {gate_params / 1e3:.1f}K)")
    if cfg.predict:  # the checkpoint's config came with it (common.parse_config)
        common.load_into(cfg.init_from, METHOD, model, flags=SHAPE_FLAGS)
        if run.is_main:
            predict(model, cfg, run)
        return
    if cfg.eval_only:
        if not release:
            common.load_into(cfg.init_from or out / 'ckpt.pt', METHOD, model, flags=SHAPE_FLAGS)
        if run.is_main:
            metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
            print(common.write_metrics(cfg, metrics))
        return

    optimizer = torch.optim.AdamW(common.param_groups(model, cfg.weight_decay), lr=cfg.lr)
    common.seed_rank(cfg, run)
    start = 0
    if cfg.resume:
        start = common.load_into(out / 'ckpt.pt', METHOD, model, optimizer, SHAPE_FLAGS)['step']
    elif cfg.init_from and not release:
        common.load_into(cfg.init_from, METHOD, model, flags=SHAPE_FLAGS)
    train_set = build_dataset(cfg, 'train', world, image_input=cfg.image_input)
    batch_stream = partial(train_batches, train_set, cfg.batch_size,
                           partial(collate, tokenizer=tokenizer, max_len=cfg.max_len), cfg.seed,
                           num_workers=cfg.num_workers, rank=run.rank, world_size=run.world_size,
                           max_bad_images=cfg.max_bad_images)
    batches = batch_stream(start_step=start * cfg.grad_accum)
    trainable = common.wrap_ddp(torch.compile(model) if cfg.compile else model, run)
    logger = common.Logger(cfg, run, start)
    one_step = lambda: caption_loss(model, next(batch_stream()), run.device)  # another data copy
    with logger.paused():  # one step's FLOPs, for mfu (CUDA only)
        logger.flops_per_sample = common.count_flops(one_step, model, cfg.batch_size, run)
    model.train()
    for step in range(start, cfg.max_steps):
        lr = common.lr_at(step, cfg)
        common.set_lr(optimizer, lr)
        for micro in range(cfg.grad_accum):
            if run.distributed:  # sync gradients on the last micro-batch only
                trainable.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with run.autocast():
                loss = caption_loss(trainable, next(batches), run.device)
            common.check_finite(loss, step, cfg)
            (loss / cfg.grad_accum).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logger.step(step, dict(loss=loss.item()), lr)
        validate = cfg.eval_every and ((step + 1) % cfg.eval_every == 0
                                       or step + 1 == cfg.max_steps)
        if validate or step + 1 == cfg.max_steps:
            # val CIDEr at every eval, the last step included: the convergence curve
            with logger.paused():
                if validate and run.is_main:
                    val = evaluate(model, cfg, 'val', run, world)
                    logger.log(dict(step=step + 1, **{f'val_{k}': v for k, v in val.items()}))
                if run.is_main:
                    common.save_checkpoint(out / 'ckpt.pt', METHOD, model, optimizer, step + 1, cfg)
    if run.is_main:
        metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
        for fraction in (90, 95):
            reached = steps_to_fraction(out / 'log.jsonl', fraction / 100)
            metrics[f'steps_to_{fraction}_cider'] = float('nan') if reached is None else reached
        print(common.write_metrics(cfg, {**metrics, **logger.speed()}))
    logger.close()
    trainable = None  # DDP's reducer goes before the process group
    common.teardown(run)


if __name__ == '__main__':
    common.main_guard(main)
