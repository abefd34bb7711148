"""
align_two_phase.py — align two frozen unimodal encoders with MLP adapters (Matryoshka + CLIP
losses), then teach a frozen causal LLM to caption from a few prefix tokens projected from the
aligned image embedding.

Sources: the seed project "Multimodal Alignment Training" (CLIP ViT-B/32 + all-MiniLM-L6-v2 ->
         adapters -> 512-d, MRL + CLIP loss; then a projector to 8 prefix tokens of
         Qwen2.5-1.5B-Instruct);
         Matryoshka Representation Learning, Kusupati et al., NeurIPS 2022, arXiv 2205.13147
         (RAIVNLab/MRL);
         CLIP, Radford et al. 2021 (openai/CLIP, mlfoundations/open_clip);
         LiT, Zhai et al., CVPR 2022;
         ClipCap, Mokady et al. 2021, arXiv 2111.09734 (rmokady/CLIP_prefix_caption).
         Decisions: specs/align_two_phase.md.

The idea in three sentences. Stage 1 keeps a pretrained vision tower and a pretrained text encoder
frozen and trains only a small MLP adapter on each so that matching image-caption pairs land close
together (the CLIP loss), and the Matryoshka loss repeats that loss on the first 8, 16, ... dims so
that every prefix of the embedding is itself a usable smaller embedding. Stage 2 freezes all of
stage 1 and trains a projector that turns an image's aligned embedding into K "prefix" token
embeddings of a frozen causal LLM, which learns to continue [prefix][prompt] with the caption and an
end-of-sequence token (ClipCap).

    python align_two_phase.py                             # ShapesWorld, both stages, CPU, minutes
    python align_two_phase.py --stage 1 --mrl_weight 0    # plain CLIP loss (the MRL ablation row)
    python align_two_phase.py --cache_features false      # encode each batch on the fly (speed row)
    python align_two_phase.py --projector transformer     # ClipCap's transformer mapper
    python align_two_phase.py --data coco --data_root /data/coco  # CLIP B/32 + MiniLM
                                                                  # + Qwen2.5-1.5B-Instruct
    torchrun --standalone --nproc_per_node=8 align_two_phase.py --data coco --data_root /data/coco
"""
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

import backbones
import common
from data import (ATTRIBUTE_WORDS, ShapesWorld, UserError, build_dataset, caption_is_true, collate,
                  eval_loader, parse_caption, pre_caption, read_captions, read_image,
                  train_batches)

METHOD = 'align_two_phase'

# ----------------------------------------------------------------------------- config & presets

@dataclass
class Config(common.RunConfig):
    vision_backbone: str = 'shapes-tiny-vision'  # frozen vision tower: HF id / path / built-in name
    text_backbone: str = 'shapes-tiny-text'      # frozen text encoder (BERT family), masked
                                                 # mean pooling
    lm_backbone: str = 'shapes-tiny-lm'          # frozen causal LLM of stage 2
    stage: str = 'both'              # 1 (adapters) | 2 (projector to the LLM) | both;
                                     # 2 alone: from --init_from
    stage1_steps: int = 1000         # stage 1's steps (max_steps and lr are stage 2's)
    stage1_lr: float = 1e-4          # stage 1's peak lr (each stage warms up over warmup_steps)
    lr: float = 1e-3                 # stage 2's peak lr
    vision_pool: str = 'cls'         # cls | mean: the vision tower's pooled feature
                                     # (one choice everywhere)
    image_size: int = 64             # pixels
    max_len: int = 32                # caption tokens (text encoder and LLM alike)
    train_images: int = 5000         # ShapesWorld training images (x5 captions): a finite set
                                     # read for many epochs
    eval_images: int = 0             # val / test images evaluated (0 = all: 1,000 on ShapesWorld)
    # stage 1: adapters, CLIP + Matryoshka losses
    d_align: int = 128               # aligned embedding width (seed: 512)
    mrl_dims: tuple = (8, 16, 32, 64, 128)        # nested prefixes the MRL loss trains
                                                  # (seed: 64..512)
    mrl_dim_weights: tuple = (1.0, 1.0, 1.0, 1.0, 1.0)  # weight of each dim's loss
                                                        # (MRL paper: all 1, summed)
    mrl_weight: float = 1.0          # total = mrl_weight * L_mrl + clip_weight * L_clip(full);
                                     # 0 = plain CLIP
    clip_weight: float = 1.0
    learn_temp: bool = True          # learnable logit scale (false: the seed's fixed
                                     # tau = temperature)
    temperature: float = 0.07        # initial tau; the scale 1/tau is clamped to max_scale after
                                     # every step
    max_scale: float = 100.0         # CLIP's clamp of exp(log_scale)
    adapter_dropout: float = 0.1
    cache_features: bool = True      # run the frozen towers once over the training rows, train on
                                     # the cache (LiT)
    # stage 2: projector to K prefix tokens of the LLM (same batch size, warm-up and cosine shape)
    prefix_tokens: int = 8           # K
    projector: str = 'mlp'           # mlp (LayerNorm + Linear) | transformer (ClipCap's mapper)
    projector_layers: int = 2        # transformer mapper depth
    projector_gelu: bool = False     # end the projector in a GELU as the seed did
    train_llm: bool = False          # fine-tune the LLM too (ClipCap's MLP + fine-tuned GPT-2 row)
    prompt: str = 'Describe this image:'  # the same at training and generation
    max_new_tokens: int = 24         # greedy decoding length cap
    captions: tuple = ()             # --predict: the captions to rank for each image,
                                     # or one .txt file of them, one per line
    renamed_flags: ClassVar[dict] = dict(phase='stage', phase2_steps='max_steps', phase2_lr='lr')


REAL = dict(vision_backbone='openai/clip-vit-base-patch32',
            text_backbone='sentence-transformers/all-MiniLM-L6-v2',
            lm_backbone='Qwen/Qwen2.5-1.5B-Instruct', image_size=224, max_len=64, d_align=512,
            mrl_dims=(64, 128, 256, 512), mrl_dim_weights=(1.0, 1.0, 1.0, 1.0), batch_size=256,
            stage1_steps=10000, stage1_lr=5e-4, warmup_steps=500, max_steps=10000, lr=2e-4,
            max_new_tokens=30, log_every=50, eval_every=2000)
PRESETS = {
    # mean pooling: the built-in ViT's [CLS] was trained for presence only
    'shapes': dict(vision_pool='mean', batch_size=128, stage1_steps=3000, stage1_lr=2e-3,
                   warmup_steps=50, max_steps=800, lr=1e-2, log_every=50),
    'coco': REAL, 'flickr30k': REAL, 'json': REAL,
}


# what a checkpoint must match
SHAPE_FLAGS = '--d_align / --projector / --prefix_tokens / --train_llm'


def check_config(cfg):
    choices = dict(stage=('1', '2', 'both'), vision_pool=('cls', 'mean'),
                   projector=('mlp', 'transformer'))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} '{getattr(cfg, name)}' is not one of {', '.join(allowed)}")
    dims = list(cfg.mrl_dims)
    if dims != sorted(set(dims)) or not 0 < dims[0] or dims[-1] > cfg.d_align:
        raise UserError(f"--mrl_dims {','.join(map(str, dims))} must rise strictly within "
                        f"1..d_align ({cfg.d_align})")
    if len(cfg.mrl_dim_weights) != len(dims):
        raise UserError(f"--mrl_dim_weights has {len(cfg.mrl_dim_weights)} values for "
                        f"{len(dims)} --mrl_dims; give one weight per dim")
    if cfg.stage == '2' and not cfg.init_from and not (cfg.resume or cfg.eval_only):
        raise UserError("--stage 2 starts from a stage-1 model: "
                        "pass --init_from out/align_two_phase/ckpt.pt")
    if cfg.batch_size < 2:
        raise UserError("--batch_size must be >= 2: the CLIP loss needs negatives")

# ----------------------------------------------------------------------------- model

class Adapter(nn.Module):
    """The trainable head on a frozen tower:
    LayerNorm -> Linear(d, 2d) -> GELU -> Dropout -> Linear(2d, d_align)."""

    def __init__(self, dim, d_align, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(2 * dim, d_align))

    def forward(self, x):  # (B, dim) -> (B, d_align)
        # not normalised: each MRL prefix is normalised on its own
        return self.net(x)


class Aligner(nn.Module):
    """Stage 1's trainable part: one adapter per tower and CLIP's logit scale, kept as log(1/tau).
    Frozen features are centred first (minus their mean over the first training rows, set once by
    set_centers): pooled features of a frozen encoder share a large common direction (mean-pooled
    BERT sentences have cosine ~0.9), and on uncentred input the adapters fall into the collapsed
    solution, every embedding equal and the CLIP loss stuck at log(batch)."""

    def __init__(self, d_image, d_text, cfg):
        super().__init__()
        self.image_adapter = Adapter(d_image, cfg.d_align, cfg.adapter_dropout)
        self.text_adapter = Adapter(d_text, cfg.d_align, cfg.adapter_dropout)
        # buffers: saved with the adapters
        self.register_buffer('image_center', torch.zeros(d_image))
        self.register_buffer('text_center', torch.zeros(d_text))
        log_scale = torch.tensor(math.log(1 / cfg.temperature))
        if cfg.learn_temp:
            self.log_scale = nn.Parameter(log_scale)
        else:  # a buffer: saved and restored, never trained
            self.register_buffer('log_scale', log_scale)

    def embed_image(self, feats):  # (B, Dv) frozen features -> (B, d_align)
        # not normalised: each MRL prefix is normalised on its own
        return self.image_adapter(feats - self.image_center)

    def embed_text(self, feats):   # (B, Dt) -> (B, d_align)
        return self.text_adapter(feats - self.text_center)

    def forward(self, image_feats, text_feats):  # (B, Dv), (B, Dt) -> (B, d_align) x 2, scale ()
        return self.embed_image(image_feats), self.embed_text(text_feats), self.log_scale.exp()

    @torch.no_grad()
    def set_centers(self, image_center, text_center):
        self.image_center.copy_(image_center)
        self.text_center.copy_(text_center)

    @torch.no_grad()
    def clamp_scale(self, max_scale):
        # CLIP clips the scale at 100 after every step so the logits cannot grow without bound
        self.log_scale.clamp_(max=math.log(max_scale))


class Projector(nn.Module):
    """Aligned image embedding -> K prefix embeddings of the LLM. mlp: LayerNorm ->
    Linear(d_align, K*H), no final activation unless --projector_gelu. transformer (ClipCap): the
    same K tokens plus K learned queries go through a few transformer layers, and the queries'
    outputs are the prefix."""

    def __init__(self, d_align, hidden, cfg):
        super().__init__()
        self.K = cfg.prefix_tokens
        self.norm, self.linear = nn.LayerNorm(d_align), nn.Linear(d_align, self.K * hidden)
        self.act = nn.GELU() if cfg.projector_gelu else nn.Identity()
        self.mapper = None
        if cfg.projector == 'transformer':
            self.queries = nn.Parameter(torch.randn(self.K, hidden) * 0.02)  # (K, H)
            n_heads = max(1, hidden // 64)
            layer = nn.TransformerEncoderLayer(hidden, n_heads, 4 * hidden, dropout=0.0,
                                               activation='gelu', batch_first=True, norm_first=True)
            self.mapper = nn.TransformerEncoder(layer, cfg.projector_layers,
                                                enable_nested_tensor=False)

    def forward(self, z):  # (B, d_align) -> (B, K, H)
        x = self.act(self.linear(self.norm(z))).view(len(z), self.K, -1)
        if self.mapper is not None:
            queries = self.queries.expand(len(z), -1, -1)                   # (B, K, H)
            x = self.mapper(torch.cat([x, queries], 1))[:, self.K:]         # (B, K, H)
        return x


class Captioner(nn.Module):
    """Stage 2: projector + causal LLM over [prefix][prompt][caption][EOS]; the module DDP wraps in
    stage 2."""

    def __init__(self, projector, lm, tokenizer, cfg):
        super().__init__()
        self.projector, self.lm, self.tokenizer, self.cfg = projector, lm, tokenizer, cfg
        # the LLM's real end-of-sequence token: [SEP] (built-in), <|im_end|> (Qwen2.5-Instruct)
        self.eos_id = (tokenizer.eos_token_id if tokenizer.eos_token_id is not None
                       else lm.config.eos_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    # z (B, d_align); ids (B, L); mask, labels (B, K+L) -> mean token NLL
    def forward(self, z, ids, mask, labels):
        x = torch.cat([self.projector(z), self.lm.get_input_embeddings()(ids)], 1)  # (B, K+L, H)
        return self.lm(inputs_embeds=x, attention_mask=mask, labels=labels).loss

    @torch.no_grad()
    def generate(self, z, prompt, blind=False):
        """Greedy captions for image embeddings z (B, d_align) -> B strings without the prompt.
        prompt: one string or one per image (then left padding: [pads][prefix][prompt], as
        decoder-only generation needs). blind: a zero prefix instead of the projected one (the
        baseline that shows how much the image contributes)."""
        prompts = [prompt] * len(z) if isinstance(prompt, str) else prompt
        enc = self.tokenizer(prompts, add_special_tokens=False, padding=True, padding_side='right',
                             return_tensors='pt').to(z.device)
        prefix = self.projector(z)                                        # (B, K, H)
        prefix = torch.zeros_like(prefix) if blind else prefix
        prompt_embeds = self.lm.get_input_embeddings()(enc.input_ids)
        x = torch.cat([prefix, prompt_embeds], 1)                         # (B, T, H), right-padded
        prefix_mask = torch.ones_like(prefix[..., 0], dtype=torch.long)   # (B, K)
        mask = torch.cat([prefix_mask, enc.attention_mask], 1)            # (B, T)
        x, mask = backbones.right_to_left_padding(x, mask)
        # (B, new): only the generated tokens with inputs_embeds
        new = self.lm.generate(inputs_embeds=x.to(self.lm.dtype), attention_mask=mask,
                               do_sample=False, max_new_tokens=self.cfg.max_new_tokens,
                               eos_token_id=self.eos_id, pad_token_id=self.pad_id)
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [' '.join(t.split()) for t in texts]


def lm_batch(tokenizer, prompt, captions, eos_id, pad_id, n_prefix, max_len):
    """Captions -> the LLM's training rows [prefix][prompt][caption][EOS][pads]. Returns ids (B, L)
    of the text part, mask and labels (B, n_prefix + L). Labels are -100 on the prefix, the prompt
    and the pads, so the loss is on the caption and its EOS only (the EOS teaches the model to
    stop)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    caption_ids = tokenizer(list(captions), add_special_tokens=False).input_ids
    rows = [prompt_ids + c[:max_len] + [eos_id] for c in caption_ids]
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n_prefix + L), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), n_prefix + L, dtype=torch.long)
    mask[:, :n_prefix] = 1
    n_prompt = len(prompt_ids)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, n_prefix:n_prefix + len(row)] = 1
        labels[b, n_prefix + n_prompt:n_prefix + len(row)] = torch.tensor(row[n_prompt:])
    return ids, mask, labels


class TwoPhase(nn.Module):
    """Frozen towers (vision, text, LLM) + the trained parts (aligner in stage 1, projector in
    stage 2)."""

    def __init__(self, cfg, vision, text, tokenizer, lm, lm_tokenizer):
        super().__init__()
        self.cfg, self.vision, self.text, self.tokenizer = cfg, vision, text, tokenizer
        self.stage = 1
        for tower in (vision, text) + (() if cfg.train_llm else (lm,)):
            tower.requires_grad_(False).eval()  # frozen and deterministic (LiT's "locked" towers)
        self.aligner = Aligner(vision.config.hidden_size, text.config.hidden_size, cfg)
        projector = Projector(cfg.d_align, lm.config.hidden_size, cfg)
        self.captioner = Captioner(projector, lm, lm_tokenizer, cfg)
        # HF recomputes only in train mode, i.e. when the LLM trains
        if cfg.grad_checkpointing and cfg.train_llm:
            lm.gradient_checkpointing_enable()

    def saved(self):
        """What ckpt.pt holds: the trained parts only, never the frozen towers (a 1.5B LLM stays
        out of it)."""
        parts = dict(aligner=self.aligner, projector=self.captioner.projector)
        return nn.ModuleDict(dict(parts, lm=self.captioner.lm) if self.cfg.train_llm else parts)

    # frozen parts stay in eval mode (no dropout): the towers, and the aligner in stage 2
    def train(self, mode=True):
        super().train(mode)
        frozen_lm = () if self.cfg.train_llm else (self.captioner.lm,)
        for frozen in (self.vision, self.text) + frozen_lm:
            frozen.eval()
        self.aligner.train(mode and self.stage == 1)
        return self

    @torch.no_grad()
    def encode_images(self, images):  # (B, 3, H, W) -> (B, Dv) pooled feature of the frozen tower
        out = self.vision(pixel_values=images.to(self.vision.dtype))
        if self.cfg.vision_pool == 'mean':
            return out.last_hidden_state.mean(1).float()
        # CLIP / SigLIP: the pooler is their trained CLS head (post-LN / attention pool); ViT's
        # [CLS] is the token
        if self.vision.config.model_type in ('clip_vision_model', 'siglip_vision_model'):
            return out.pooler_output.float()
        return out.last_hidden_state[:, 0].float()

    # (B, L) -> (B, Dt): masked mean over tokens (sentence-transformers' pooling)
    @torch.no_grad()
    def encode_texts(self, ids, mask):
        outputs = self.text(input_ids=ids, attention_mask=mask)
        hidden = outputs.last_hidden_state.float()  # (B, L, Dt)
        m = mask[..., None].float()
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)

    # (B, 3, H, W) -> (B, d_align) unit-norm aligned embedding (stage 2's input)
    @torch.no_grad()
    def embed_images(self, images):
        return F.normalize(self.aligner.embed_image(self.encode_images(images)), dim=-1)

    def generate(self, images, prompt=None, blind=False):
        """Images (B, 3, H, W) -> B greedy captions (strings, without the prompt)."""
        return self.captioner.generate(self.embed_images(images), prompt or self.cfg.prompt, blind)

# ----------------------------------------------------------------------------- losses

def clip_loss(image, text, scale):
    """CLIP's symmetric cross-entropy: image i's positive is text i among the N texts, and vice
    versa. image, text: (N, d) unit vectors; scale: 1/tau."""
    logits = scale * image @ text.T                           # (N, N)
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def truncate(x, m):
    """The Matryoshka embedding of width m: the first m dims, re-normalised to unit length."""
    return F.normalize(x[:, :m], dim=-1)


def mrl_loss(image, text, scale, dims, weights):
    """Matryoshka: the CLIP loss of every nested prefix m in dims, weighted and summed.
    image, text: (N, d_align)."""
    return sum(w * clip_loss(truncate(image, m), truncate(text, m), scale)
               for m, w in zip(dims, weights))


def alignment_loss(image, text, scale, cfg):
    """Stage 1: mrl_weight * L_mrl + clip_weight * L_clip(full dim) on raw (N, d_align) adapter
    outputs."""
    full = clip_loss(truncate(image, image.shape[1]), truncate(text, text.shape[1]), scale)
    mrl = (mrl_loss(image, text, scale, cfg.mrl_dims, cfg.mrl_dim_weights) if cfg.mrl_weight
           else torch.zeros(()))
    return dict(loss=cfg.mrl_weight * mrl + cfg.clip_weight * full, mrl=mrl.detach(),
                clip=full.detach(), scale=scale.detach())


def stage1_loss(model, aligner, batch, cfg):
    """One stage-1 micro-batch: frozen features (cached, or encoded now) -> adapters -> gather ->
    loss."""
    if cfg.cache_features:
        image_feats, text_feats = batch['image'], batch['text']  # (B, Dv), (B, Dt) from the cache
    else:
        image_feats = model.encode_images(batch['image'])
        text_feats = model.encode_texts(batch['input_ids'], batch['attention_mask'])
    # aligner: model.aligner, DDP-wrapped or not
    image, text, scale = aligner(image_feats, text_feats)
    # every rank scores its B pairs against all world*B: the gather keeps gradients
    # (2 ranks x B == 1 x 2B)
    return alignment_loss(common.all_gather(image), common.all_gather(text), scale, cfg)


def stage2_loss(model, captioner, batch, cfg):
    """One stage-2 micro-batch: frozen aligned image embedding -> projector -> LLM caption NLL."""
    with torch.no_grad():
        feats = batch['image'] if cfg.cache_features else model.encode_images(batch['image'])
        z = F.normalize(model.aligner.embed_image(feats), dim=-1)   # (B, d_align)
    cap = model.captioner
    ids, mask, labels = lm_batch(cap.tokenizer, cfg.prompt, batch['caption'], cap.eos_id,
                                 cap.pad_id, cfg.prefix_tokens, cfg.max_len)
    device = z.device
    return dict(loss=captioner(z, ids.to(device), mask.to(device), labels.to(device)))

# ----------------------------------------------------------- data: captions kept, feature cache

CENTER_ROWS = 4096  # training rows whose mean frozen features centre the adapters' input


@torch.no_grad()
def encoded_rows(model, dataset, collate_fn, cfg, device, desc, show=True):
    """The frozen towers over a data set in row order -> per batch (image feats (B, Dv), text feats
    (B, Dt), captions). Unreadable images are skipped and counted against --max_bad_images."""
    n_bad = 0
    loader = eval_loader(dataset, cfg.batch_size, collate_fn, cfg.num_workers)
    for batch in tqdm(loader, desc=desc, disable=not show, dynamic_ncols=True):
        n_bad += batch['n_bad']
        if n_bad > cfg.max_bad_images:
            raise UserError(f"{n_bad} images could not be read while {desc}, more than "
                            f"--max_bad_images {cfg.max_bad_images}; fix the files or raise "
                            f"--max_bad_images")
        if 'image' in batch:
            image_feats = model.encode_images(batch['image'].to(device)).cpu()           # (B, Dv)
            ids, mask = batch['input_ids'].to(device), batch['attention_mask'].to(device)
            text_feats = model.encode_texts(ids, mask).cpu()                              # (B, Dt)
            yield image_feats, text_feats, batch['caption']


def feature_centers(model, dataset, collate_fn, cfg, device, show=True):
    """Mean frozen image and text features over the first CENTER_ROWS training rows (the same rows
    with or without the feature cache, so both train the same adapters)."""
    rows = torch.utils.data.Subset(dataset, range(min(CENTER_ROWS, len(dataset))))
    encoded = encoded_rows(model, rows, collate_fn, cfg, device, 'centring features', show)
    image, text, _ = zip(*encoded)
    return torch.cat(image).mean(0), torch.cat(text).mean(0)


class FeatureCache(Dataset):
    """The frozen towers' features of every readable training row, in row order. Rows of one image
    repeat its image feature; an augmented data set (COCO) is cached with one draw of its
    augmentation, as LiT's cache is."""

    def __init__(self, model, dataset, collate_fn, cfg, device, show=True):
        encoded = encoded_rows(model, dataset, collate_fn, cfg, device, 'caching features', show)
        image, text, captions = zip(*encoded)
        # (N, Dv), (N, Dt), on the CPU like any data
        self.image, self.text = torch.cat(image), torch.cat(text)
        self.captions = [c for batch in captions for c in batch]

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, k):
        return dict(image=self.image[k], text=self.text[k], caption=self.captions[k])


def collate_cached(items):
    return dict(image=torch.stack([it['image'] for it in items]),
                text=torch.stack([it['text'] for it in items]),
                caption=[it['caption'] for it in items], n_bad=0)


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def embed_texts(model, texts, cfg, device):  # -> (N, d_align) raw aligned text embeddings
    out = []
    for s in range(0, len(texts), 4 * cfg.batch_size):
        enc = model.tokenizer(texts[s:s + 4 * cfg.batch_size], padding=True, truncation=True,
                              max_length=cfg.max_len, return_tensors='pt').to(device)
        out.append(model.aligner.embed_text(model.encode_texts(enc.input_ids, enc.attention_mask)))
    return torch.cat(out)


def draw_retrieval(model, cfg, dataset, world, image, image_emb, text_emb, caption, path):
    """PNG: test image 0 beside its top-5 captions at the smallest and the full dim, each caption's
    tokens shaded by its cosine similarity to the image at that dim, red = true of the image; then
    the stage-2 caption."""
    is_true = ((lambda c: parse_caption(c) is not None
                          and caption_is_true(c, world.scene('test', 0)))
               if world is not None else (lambda c: c in dataset.captions[0]))
    rows = []
    for m in (cfg.mrl_dims[0], cfg.d_align):
        cosine = truncate(text_emb, m) @ truncate(image_emb[None], m)[0]   # (N_txt,)
        for rank, t in enumerate(cosine.topk(5).indices.tolist()):
            text = dataset.texts[t]
            tokens = [(w, cosine[t].item(), is_true(text)) for w in text.split()]
            rows.append((f"d{m} #{rank + 1}  cos={cosine[t]:.2f}", tokens))
    if caption is not None:
        rows.append(('stage 2 caption', [(w, 0.0, is_true(caption)) for w in caption.split()]))
    title = f'top-5 captions at d={cfg.mrl_dims[0]} and d={cfg.d_align}'
    common.render_tokens(image, rows, str(path), title=title, mark_label='true of the image')


@torch.no_grad()
def evaluate(model, cfg, split, run, world, png=None):
    """Retrieval both ways at every MRL dim (d{m}_*) and at the full dim (tr1 ... rmean); on
    ShapesWorld swap_acc; once stage 2 has trained (model.stage == 2), its caption metrics and the
    blind-prefix CIDEr; optionally the PNG."""
    model.eval()
    tokenizer, device, captions = model.tokenizer, run.device, model.stage == 2
    dataset = build_dataset(cfg, split, world, max_images=cfg.eval_images)
    image_emb, predictions, blind, references, first_image = [], {}, {}, {}, None
    collate_fn = partial(collate, tokenizer=tokenizer, max_len=cfg.max_len)
    for batch in eval_loader(dataset, cfg.batch_size, collate_fn):
        images = batch['image'].to(device)
        image_emb.append(model.aligner.embed_image(model.encode_images(images)))   # (B, d_align)
        first_image = images[0] if first_image is None else first_image
        if captions:
            z = F.normalize(image_emb[-1], dim=-1)
            preds = model.captioner.generate(z, cfg.prompt)
            preds_blind = model.captioner.generate(z, cfg.prompt, blind=True)
            for i, pred, pred_blind, refs in zip(batch['image_id'].tolist(), preds, preds_blind,
                                                 batch['captions']):
                predictions[i], blind[i], references[i] = pred, pred_blind, refs
    image_emb = torch.cat(image_emb)                                       # (N_img, d_align)
    text_emb = embed_texts(model, dataset.texts, cfg, device)   # (N_txt, d_align)
    metrics = {}
    for m in cfg.mrl_dims:
        sims = truncate(image_emb, m) @ truncate(text_emb, m).T
        recalls = common.retrieval_metrics(sims, dataset.img2txt, dataset.texts)
        metrics.update({f'd{m}_{k}': v for k, v in recalls.items()})
    # (N_img, N_txt) cosines
    full = truncate(image_emb, cfg.d_align) @ truncate(text_emb, cfg.d_align).T
    metrics.update(common.retrieval_metrics(full, dataset.img2txt, dataset.texts))
    if world is not None:  # compositional test: the true caption must outscore its one-word swap
        swaps = world.swap_pairs(split, len(image_emb), cfg.seed)
        index = torch.tensor([s[0] for s in swaps], device=device)
        image_unit = truncate(image_emb, cfg.d_align)[index]
        scores = [(image_unit * truncate(embed_texts(model, [s[k] for s in swaps], cfg, device),
                                         cfg.d_align)).sum(-1) for k in (1, 2)]
        won = (scores[0] > scores[1]).cpu()
        metrics['swap_acc'] = 100 * won.float().mean().item()
        for attribute in ATTRIBUTE_WORDS:
            chosen = torch.tensor([s[3] == attribute for s in swaps])
            metrics[f'swap_acc_{attribute}'] = 100 * won[chosen].float().mean().item()
    if captions:
        metrics.update(common.caption_metrics(predictions, references))
        metrics['blind_cider'] = common.caption_metrics(blind, references)['cider']
    if png:
        draw_retrieval(model, cfg, dataset, world, first_image, image_emb[0], text_emb,
                       predictions.get(0), png)
    model.train()
    return metrics


# ----------------------------------------------------------------------------- training loop

def load_stage_checkpoint(path, saved):
    """load_into for --eval_only / --resume: the checkpoint must say which stage wrote it."""
    state = common.load_into(path, METHOD, saved, flags=SHAPE_FLAGS)
    if 'stage' not in state:  # written before 'phase' was renamed 'stage'
        raise UserError(f"{path} does not say which stage wrote it: it comes from an older "
                        f"align_two_phase.py (which called it 'phase'); retrain, or load it, set "
                        f"ckpt['stage'] = ckpt.pop('phase') and torch.save it again")
    return state


@torch.no_grad()
def predict(model, cfg, run):
    """--predict: for each image file, its greedy caption once stage 2 has trained, and the
    --captions ranked by the cosine of the aligned embeddings at the full dim (evaluate()'s
    retrieval score). A stage-1 checkpoint has no captioner: it needs --captions."""
    model.stage = load_stage_checkpoint(cfg.init_from, model.saved())['stage']
    captions = read_captions(cfg.captions)
    if not captions and model.stage == 1:
        raise UserError(f"{cfg.init_from} finished stage 1 only (no captioner): it ranks captions "
                        f"for each image; pass --captions 'a red circle' 'a blue square' (or one "
                        f".txt file of them, one per line)")
    images = [read_image(path, cfg.image_size) for path in cfg.predict]  # all readable, first
    model.eval()
    if captions:
        cleaned = [pre_caption(c) for c in captions]  # as the captions of training and evaluate()
        text_emb = truncate(embed_texts(model, cleaned, cfg, run.device), cfg.d_align)  # (C, d)
    for path, image in zip(cfg.predict, images):
        image = image[None].to(run.device)                                     # (1, 3, H, W)
        print(path)
        if model.stage == 2:
            print(f"  caption: {model.generate(image)[0]}")
        if captions:
            image_emb = model.aligner.embed_image(model.encode_images(image))  # (1, d_align)
            cosine = (truncate(image_emb, cfg.d_align) @ text_emb.T)[0].tolist()  # C cosines
            for c in sorted(range(len(captions)), key=lambda c: -cosine[c]):
                print(f"  cos {cosine[c]:.2f}  {captions[c]}")


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv, stem=METHOD)
    check_config(cfg)
    run = common.setup(cfg)
    out = Path(cfg.out_dir)
    world = None
    if cfg.data == 'shapes':
        world = ShapesWorld(seed=0, image_size=cfg.image_size, train_images=cfg.train_images)
    if not cfg.predict:  # --predict reads no data set
        build_dataset(cfg, 'test', world, max_images=1)  # fail early on a bad path or file
    tokenizer = backbones.load_tokenizer(cfg.text_backbone)
    lm_tokenizer = backbones.load_tokenizer(cfg.lm_backbone)
    # frozen towers in bf16 on CUDA, trained weights fp32
    frozen_dtype = None if cfg.train_llm else run.dtype
    vision = backbones.load_backbone(cfg.vision_backbone, 'vision', dtype=run.dtype)
    text = backbones.load_backbone(cfg.text_backbone, 'text', dtype=run.dtype)
    lm = backbones.load_backbone(cfg.lm_backbone, 'lm', dtype=frozen_dtype)
    model = TwoPhase(cfg, vision, text, tokenizer, lm, lm_tokenizer).to(run.device)
    saved = model.saved()
    if cfg.predict:
        if run.is_main:
            predict(model, cfg, run)
        return
    if cfg.eval_only:
        state = load_stage_checkpoint(cfg.init_from or out / 'ckpt.pt', saved)
        model.stage = state['stage']
        metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
        if run.is_main:
            print(common.write_metrics(cfg, metrics))
        return

    state, start = None, 0
    if cfg.resume:
        state = load_stage_checkpoint(out / 'ckpt.pt', saved)
        start = state['step']
    elif cfg.init_from:  # weights only (e.g. --stage 2 from a stage-1 run)
        common.load_into(cfg.init_from, METHOD, saved, flags=SHAPE_FLAGS)
    train_set = build_dataset(cfg, 'train', world)
    collate_fn = partial(collate, tokenizer=tokenizer, max_len=cfg.max_len)
    if cfg.stage != '2' and start == 0:  # a fresh stage 1: centre the adapters' input (see Aligner)
        centers = feature_centers(model, train_set, collate_fn, cfg, run.device, run.is_main)
        model.aligner.set_centers(*centers)
    cache_seconds = 0.0
    # LiT: the towers are frozen, so their features never change; compute them once
    if cfg.cache_features:
        t0 = time.perf_counter()
        train_set = FeatureCache(model, train_set, collate_fn, cfg, run.device, run.is_main)
        collate_fn = collate_cached
        cache_seconds = time.perf_counter() - t0
    common.seed_rank(cfg, run)  # after centring and caching: their loaders draw from the global RNG
    stages = common.stage_ranges(cfg)
    logger = common.Logger(replace(cfg, max_steps=stages[-1][2]), run, start)
    speed = dict(cache_seconds=cache_seconds)
    trainable = None
    for stage, first, last in stages:
        if last <= max(first, start):
            continue
        # stage 1 trains the aligner; stage 2 freezes it and trains the projector
        # (+ the LLM with --train_llm)
        trainable = None  # stage 1's DDP wrapper goes before stage 2's is built
        module = model.aligner if stage == 1 else model.captioner
        model.stage = stage
        model.aligner.requires_grad_(stage == 1)
        schedule = common.stage_schedule(cfg, stage, first, last)
        optimizer = torch.optim.AdamW(common.param_groups(module, cfg.weight_decay), lr=schedule.lr)
        common.resume_stage(state, stage, first, start, saved, optimizer, out / 'ckpt.pt',
                            SHAPE_FLAGS)
        trainable = common.wrap_ddp(torch.compile(module) if cfg.compile else module, run)
        model.train()
        loss_fn = stage1_loss if stage == 1 else stage2_loss
        batch_stream = partial(train_batches, train_set, cfg.batch_size, collate_fn, cfg.seed,
                               num_workers=cfg.num_workers, rank=run.rank,
                               world_size=run.world_size, max_bad_images=cfg.max_bad_images)
        batches = batch_stream(start_step=(max(first, start) - first) * cfg.grad_accum)
        # for MFU, on another copy of the data
        fresh_batch = lambda: common.to_device(next(batch_stream()), run.device)
        one_step = lambda: loss_fn(model, module, fresh_batch(), cfg)['loss']
        with logger.paused():  # one step's FLOPs, for mfu (CUDA only)
            logger.flops_per_sample = common.count_flops(one_step, model, cfg.batch_size, run)
        seconds, steps = logger.train_seconds, logger.steps_done
        for step in range(max(first, start), last):
            lr = common.lr_at(step - first, schedule)
            common.set_lr(optimizer, lr)
            for micro in range(cfg.grad_accum):
                if run.distributed:  # sync gradients on the last micro-batch only
                    trainable.require_backward_grad_sync = micro == cfg.grad_accum - 1
                batch = common.to_device(next(batches), run.device)
                with run.autocast():
                    losses = loss_fn(model, trainable, batch, cfg)
                common.check_finite(losses['loss'], step, cfg)
                (losses['loss'] / cfg.grad_accum).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if stage == 1:
                model.aligner.clamp_scale(cfg.max_scale)
            logger.step(step, {k: v.item() for k, v in losses.items()}, lr)
            validate = (cfg.eval_every and (step + 1 - first) % cfg.eval_every == 0
                        and step + 1 < last)
            if validate or step + 1 == last:
                with logger.paused():
                    if validate and run.is_main:
                        val = evaluate(model, cfg, 'val', run, world)
                        logger.log(dict(step=step + 1, **{f'val_{k}': v for k, v in val.items()}))
                    if run.is_main:
                        common.save_checkpoint(out / 'ckpt.pt', METHOD, saved, optimizer,
                                               step + 1, cfg, stage=stage)
        seconds, steps = logger.train_seconds - seconds, logger.steps_done - steps
        speed[f'stage{stage}_train_seconds'] = seconds
        speed[f'stage{stage}_samples_per_s'] = logger.samples_per_step * steps / max(seconds, 1e-9)

    if run.is_main:
        model.stage = 2 if cfg.stage != '1' else 1
        metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
        if model.stage == 2:  # three sample captions, for the eye
            samples = build_dataset(cfg, 'test', world, max_images=3)
            images = torch.stack([samples[i]['image'] for i in range(len(samples))]).to(run.device)
            for i, caption in enumerate(model.eval().generate(images)):
                reference = samples[i]['captions'][0]
                tqdm.write(f"test image {i}: {caption!r}  (reference: {reference!r})")
        print(common.write_metrics(cfg, {**metrics, **logger.speed(), **speed}))
    logger.close()
    trainable = None  # DDP's reducer goes before the process group
    common.teardown(run)


if __name__ == '__main__':
    common.main_guard(main)
