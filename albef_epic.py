"""
albef_epic.py — ALBEF (align before fuse) with EPIC's per image-token consistency, and its
efficient variant.

Papers: ALBEF, "Align before Fuse", Li et al., NeurIPS 2021, arXiv 2107.07651
        (code: salesforce/ALBEF);
        EPIC, "Leveraging per Image-Token Consistency for Vision-Language Pre-training",
        Gou et al., CVPR 2023, arXiv 2211.15398 (no official code).
        Decisions taken where no source fixes them: specs/albef_epic.md.

The idea in three sentences. ALBEF aligns an image encoder and a text encoder with a contrastive
loss (ITA) against a queue of a momentum teacher's features before a fusion encoder cross-attends
from text to image, and trains the fusion with image-text matching on hard negatives (ITM) and
masked language modelling (MLM), distilling the teacher's soft targets into both. A vision-language
model can still learn to predict a masked word from the rest of the caption alone; EPIC therefore
masks words drawn by how much their match with this image rests on the image (the teacher's
saliency: Grad-CAM of its matching score), lets a small text-only language model write plausible
but image-inconsistent replacements, and trains a head to say, token by token, whether each word
of the corrupted caption is consistent with the image (ITC).

    python albef_epic.py                    # ShapesWorld, EPIC with saliency masking, CPU, minutes
    python albef_epic.py --epic none        # plain ALBEF (the ablation's first row)
    python albef_epic.py --epic random      # consistency task on randomly chosen tokens
    python albef_epic.py --mask_temperature 0   # rewrite the most salient words (top-k)
    python albef_epic.py --lambda_itc 8         # EPIC's consistency weight (the preset's is 2)
    python albef_epic.py --prune_keep 0.5   # E-PITC: the consistency pass sees the top 50% patches
    python albef_epic.py --data coco --data_root /data/coco   # DeiT-B/16 + BERT-base 6+6, 256 px
    torchrun --standalone --nproc_per_node=8 albef_epic.py --data coco --data_root /data/coco
"""
import copy
import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import backbones
import common
from backbones import padding_mask
from data import (ATTRIBUTE_WORDS, ShapesWorld, UserError, build_dataset, collate, eval_loader,
                  pre_caption, read_captions, read_image, train_batches, true_pairs,
                  visual_token_ids)

METHOD = 'albef_epic'

# ----------------------------------------------------------------------------- config & presets

@dataclass
class Config(common.RunConfig):
    vision_backbone: str = 'shapes-tiny-vision'  # ViT / DeiT / CLIP: HF id, path or built-in name
    text_backbone: str = 'shapes-tiny-text'  # BERT MLM: first layers encode text, last layers fuse
    fusion_layers: int = 2          # last BERT layers, with cross-attention (ALBEF: 6 of 12)
    image_size: int = 64            # pixels (position embeddings are interpolated to the grid)
    max_len: int = 32               # caption tokens
    embed_dim: int = 256            # ITA projection width
    temp: float = 0.07              # initial temperature (learnable, clamped to [0.001, 0.5])
    temp_lr: float = 1e-4           # its peak lr: ALBEF's, whatever --lr (at 1e-3 it falls fast)
    queue_size: int = 4096          # momentum features kept as extra negatives (ALBEF: 65,536)
    momentum: float = 0.995         # EMA rate of the teacher
    alpha: float = 0.4              # weight of the teacher's soft targets in ITA and MLM
    alpha_warmup_steps: int = 500   # alpha ramps linearly from 0 (ALBEF: over the first epoch)
    multi_positive: bool = True     # same image id or caption text = positive, batch and queue
    hard_negative_warmup: int = 0   # ITM negatives: uniform -> similarity-weighted over these steps
    mlm_prob: float = 0.15          # MLM masking rate (80% [MASK] / 10% random / 10% kept)
    epic: str = 'saliency'          # which tokens get rewritten: none (ALBEF) | random | saliency
    saliency: str = 'gradcam'       # gradcam (Grad-CAM of the teacher's ITM score on a fusion
                                    # layer's cross-attention) | necessity (what the image adds)
    gradcam_layer: int = 0          # the fusion layer Grad-CAM reads, counted from the first
                                    # (ALBEF's Grounding.py: BERT layer 8 = fusion layer 2 of 6)
    mask_ratio: float = 0.35        # EPIC rewrites ceil(mask_ratio * n) tokens of an n-word caption
    mask_temperature: float = 1.0   # tokens drawn without replacement with p ~ softmax(z / T),
                                    # z = the caption's standardised saliency (0: the top-k)
    lambda_itc: float = 8.0         # weight of the consistency loss
    generator_layers: int = 2       # depth of the text-only generator (the first text layers)
    prune_keep: float = 1.0         # E-PITC: fraction of patches the consistency pass sees
    k_test: int = 16                # ITM re-ranks the top-k ITA candidates (ALBEF: 256 / 128)
    eval_images: int = 0            # val / test images evaluated (0 = all: 1,000 on ShapesWorld)
    grad_clip: float = 0.0          # ALBEF does not clip (a clip at 1 shrinks its ~20-norm steps)
    captions: tuple = ()            # --predict: captions to rank, or a .txt file, one per line


REAL = dict(vision_backbone='facebook/deit-base-patch16-224', text_backbone='bert-base-uncased',
            fusion_layers=6, image_size=256, max_len=40, queue_size=65536, batch_size=64, lr=1e-4,
            weight_decay=0.02, warmup_steps=2000, max_steps=100_000, alpha_warmup_steps=2000,
            k_test=256, log_every=50, eval_every=5000, grad_checkpointing=True, gradcam_layer=2)
PRESETS = {  # shapes: ~9 minutes on a 2-core CPU (README). A run this short wants a short queue
    # (the teacher's features go stale within a few steps: a 1,024 queue cost 17 rmean), a high lr,
    # and ITM negatives that become hard only once ITM has learned the easy ones (hard negatives
    # from step 0 kept ITM at chance). The consistency loss weighs 2, not EPIC's 8: at 8 it
    # outweighs MLM and ITM together and cost 7 rmean (three seeds each, README).
    'shapes': dict(batch_size=64, max_steps=1150, lr=1e-3, warmup_steps=100, queue_size=256,
                   hard_negative_warmup=400, log_every=20, lambda_itc=2.0),
    'coco': REAL, 'flickr30k': dict(REAL, k_test=128), 'json': REAL,
}


# what a checkpoint must match
SHAPE_FLAGS = '--epic / --embed_dim / --queue_size / --fusion_layers or the backbones'


def check_config(cfg):
    choices = dict(epic=('none', 'random', 'saliency'), saliency=('gradcam', 'necessity'))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} '{getattr(cfg, name)}' is not one of {', '.join(allowed)}")
    if not 0 < cfg.prune_keep <= 1 or not 0 < cfg.mask_ratio <= 1:
        raise UserError(f"--prune_keep ({cfg.prune_keep}) and --mask_ratio ({cfg.mask_ratio}) "
                        f"are fractions in (0, 1]")
    if cfg.mask_temperature < 0:
        raise UserError(f"--mask_temperature {cfg.mask_temperature} must be >= 0 (0: the top-k)")
    # Only the [CLS] row of the last fusion layer reaches the ITM score: its word rows get no
    # gradient, so Grad-CAM there is 0 for every word.
    if cfg.saliency == 'gradcam' and not 0 <= cfg.gradcam_layer < cfg.fusion_layers - 1:
        raise UserError(f"--gradcam_layer {cfg.gradcam_layer} must be a fusion layer below the "
                        f"last, 0 .. {cfg.fusion_layers - 2} of --fusion_layers "
                        f"{cfg.fusion_layers} (the last one's words get no ITM gradient); "
                        f"with one fusion layer use --saliency necessity")
    if cfg.batch_size < 2:
        raise UserError("--batch_size must be >= 2: "
                        "ITM draws each hard negative from the rest of the batch")

# ----------------------------------------------------------------------------- modules

class ALBEF(nn.Module):
    """Image encoder (ViT), text encoder (the first BERT layers), fusion encoder (the last BERT
    layers with new cross-attention to the image tokens), ITA projections, ITM head and the BERT
    MLM head. The momentum teacher is a second copy of this module."""

    def __init__(self, cfg, vision_hf, text_hf):
        super().__init__()
        self.visual_encoder = backbones.vit_from_hf(vision_hf, cfg.image_size)
        self.visual_encoder.grad_checkpointing = cfg.grad_checkpointing
        n_layers, d_image = text_hf.config.num_hidden_layers, vision_hf.config.hidden_size
        if not 0 < cfg.fusion_layers < n_layers:
            raise UserError(f"--fusion_layers {cfg.fusion_layers}: the text backbone has "
                            f"{n_layers} layers, and both the text and the fusion encoder "
                            f"need at least one")
        first_fusion = n_layers - cfg.fusion_layers
        self.embeddings, layers, self.mlm_head, _ = backbones.bert_from_hf(
            text_hf, cross_layers=range(first_fusion, n_layers), cross_dim=d_image)
        self.text_layers, self.fusion_layers = layers[:first_fusion], layers[first_fusion:]
        d_text = text_hf.config.hidden_size
        self.vision_proj = nn.Linear(d_image, cfg.embed_dim)
        self.text_proj = nn.Linear(d_text, cfg.embed_dim)
        self.itm_head = nn.Linear(d_text, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.grad_checkpointing = cfg.grad_checkpointing

    def encode_image(self, images):  # (B, 3, H, W) -> (B, 1+N, Dv)
        return self.visual_encoder(images)

    def encode_image_ranked(self, images):
        """-> image tokens (B, 1+N, Dv) and patch scores (B, N): the last ViT block's [CLS]
        attention to each patch, mean over heads (E-PITC's ranking: no caption involved)."""
        image_embeds, attn = self.visual_encoder(images, return_attn=True)
        n_special = self.visual_encoder.n_special
        return image_embeds, attn[:, :, 0, n_special:].float().mean(1)

    def encode_text(self, ids, mask):  # (B, L) -> (B, L, Dt), text layers only (no image)
        x, attn_mask = self.embeddings(ids), padding_mask(mask)
        for layer in self.text_layers:
            x = backbones.checkpointed(layer, x, attn_mask, on=self.grad_checkpointing)
        return x

    def fuse(self, text, mask, image, return_attn=False):
        """Fusion layers: text (B, L, Dt) cross-attends to image tokens (B, M, Dv) -> (B, L, Dt);
        with return_attn also the per-layer (self-attention, cross-attention) probabilities
        (B, heads, L, L) and (B, heads, L, M). image=None runs the fusion layers on text alone
        (cross-attention skipped)."""
        x, attn_mask, attns = text, padding_mask(mask), []
        for layer in self.fusion_layers:
            if return_attn:
                x, probs = layer(x, attn_mask, image, return_attn=True)
                attns.append(probs)
            else:
                x = backbones.checkpointed(layer, x, attn_mask, image, on=self.grad_checkpointing)
        return (x, attns) if return_attn else x

    def image_feature(self, image_embeds):  # (B, 1+N, Dv) -> (B, E) unit vectors from [CLS]
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_feature(self, text_embeds):  # (B, L, Dt) -> (B, E)
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def itm_logit(self, image_embeds, text_embeds, mask):
        # paired rows -> (B,) ITM score of "match" (ALBEF's)
        return self.itm_head(self.fuse(text_embeds, mask, image_embeds)[:, 0])[:, 1]


class Generator(nn.Module):
    """EPIC's auxiliary masked LM over text alone (with the image it would write image-consistent
    words that the labels call inconsistent). A small BERT made of the text backbone's first layers
    and its MLM head transform; it reads the student's token embeddings and scores the vocabulary
    against the student's word embeddings, which it shares (as ELECTRA's generator does), so it
    owns only its layers and head."""

    def __init__(self, cfg, text_hf):
        super().__init__()
        _, layers, head, _ = backbones.bert_from_hf(text_hf)
        self.layers = layers[:cfg.generator_layers]
        self.dense, self.act, self.norm = head.dense, head.act, head.norm
        self.bias = head.decoder.bias

    def forward(self, x, mask, word_embeddings):
        # x (B, L, D) embedded masked caption -> logits (B, L, V)
        for layer in self.layers:
            x = layer(x, padding_mask(mask))
        return F.linear(self.norm(self.act(self.dense(x))), word_embeddings, self.bias)


# -------------------------------------------------------------------------- losses and their pieces

def own_columns(B):
    """The columns of this rank's own batch in the gathered [W*B ; queue] bank."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return slice(rank * B, (rank + 1) * B)


def text_keys(ids, mask):
    """(B, L) -> (B,) a 31-bit key per caption text (crc32 of its token ids): identical texts
    share a key."""
    return torch.tensor([zlib.crc32(row[m].numpy().tobytes()) & 0x7FFFFFFF
                         for row, m in zip(ids.cpu(), mask.cpu().bool())])


def pair_labels(batch, world):
    """What the loss needs to know about which pairs of a batch match, beyond its own pairs: a key
    per caption text (identical texts are positives) and, on ShapesWorld, which captions are true
    of which images (a caption of another image that is true of this one must not be drawn as its
    ITM negative)."""
    batch['text_key'] = text_keys(batch['input_ids'], batch['attention_mask'])
    if world is not None:
        scenes = [world.scene('train', i) for i in batch['index'].tolist()]
        batch['true_pairs'] = true_pairs(batch['caption'], scenes)
    return batch


def positive_mask(image_id, text_key, bank_id, bank_key, multi_positive):
    """(B,) queries against (K,) bank entries -> (B, K) float: 1 for the query's own pair in the
    gathered batch, and with multi_positive for every entry of the same image or with identical
    caption text."""
    B = len(image_id)
    own = torch.zeros(B, len(bank_id), device=image_id.device)
    own[torch.arange(B), own_columns(B).start + torch.arange(B)] = 1
    if not multi_positive:
        return own
    same = (image_id[:, None] == bank_id[None]) | (text_key[:, None] == bank_key[None])
    return torch.maximum(own, same.float())


def ita_targets(sims_m, positives, alpha):
    """ALBEF's distilled contrastive targets: alpha * softmax(teacher similarities)
    + (1 - alpha) * the positives spread evenly. sims_m, positives: (B, K) -> (B, K) rows that
    sum to 1."""
    return (alpha * F.softmax(sims_m, dim=1)
            + (1 - alpha) * positives / positives.sum(1, keepdim=True))


def soft_cross_entropy(logits, targets):  # (B, K) logits, (B, K) target distributions -> mean CE
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


def sample_negatives(sims, same, eps=1e-6):
    """One hard negative per row: drawn from softmax(sims) (B, B) with the row's positives (same
    image or text) excluded; the eps keeps every real negative drawable. A row with no negative in
    the local batch (every other row shows its image or a caption true of it) falls back to any
    other row. Needs B >= 2."""
    weights = (F.softmax(sims, dim=1) + eps).masked_fill(same.bool(), 0)
    none_left = weights.sum(1) == 0
    weights[none_left] = 1 - torch.eye(len(sims), device=sims.device)[none_left]
    return torch.multinomial(weights, 1).squeeze(1)


def mask_tokens(ids, maskable, mask_id, special_ids, vocab_size, prob):
    """BERT masking: each maskable token is chosen with probability prob; chosen tokens become
    [MASK] (80%), a random non-special token (10%) or stay (10%).
    -> (masked ids, labels with -100 on the tokens not chosen)."""
    chosen = maskable & (torch.rand(ids.shape, device=ids.device) < prob)
    labels = ids.masked_fill(~chosen, -100)
    draw = torch.rand(ids.shape, device=ids.device)
    masked = ids.masked_fill(chosen & (draw < 0.8), mask_id)
    random_ids = torch.randint(vocab_size, ids.shape, device=ids.device)
    while torch.isin(random_ids, special_ids).any():  # redraw specials; a few rounds at most
        random_ids = torch.where(torch.isin(random_ids, special_ids),
                                 torch.randint_like(random_ids, vocab_size), random_ids)
    return torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, masked), labels


def distilled_mlm_loss(logits, logits_m, labels, alpha):
    """(1 - alpha) * CE(labels) + alpha * CE(teacher's distribution), over the masked tokens
    (0 when none is)."""
    chosen = labels != -100
    if not chosen.any():
        return logits.sum() * 0
    ce = F.cross_entropy(logits[chosen].float(), labels[chosen])
    teacher_probs = F.softmax(logits_m[chosen].float(), dim=-1)
    distill = soft_cross_entropy(logits[chosen].float(), teacher_probs)
    return (1 - alpha) * ce + alpha * distill


def top_fraction(scores, allowed, fraction):
    """(B, L) -> bool mask of the ceil(fraction * n) highest-scoring allowed tokens per row
    (n = allowed per row, at least 1 when n >= 1)."""
    n = allowed.sum(1, keepdim=True)                                            # (B, 1)
    k = torch.clamp((fraction * n).ceil(), min=1).minimum(n)
    best_first = scores.masked_fill(~allowed, -math.inf).argsort(1, descending=True)
    rank = best_first.argsort(1)                                                # 0 = best
    return allowed & (rank < k)


def sample_tokens(scores, allowed, fraction, temperature, generator=None):
    """(B, L) -> bool mask of ceil(fraction * n) allowed tokens per row, drawn without replacement
    with probability ~ softmax(z / temperature), z = the row's scores standardised over its
    allowed tokens (so the temperature does not depend on the scores' scale). Gumbel-top-k: the
    top k of z / T + Gumbel noise are such a draw (Kool et al., ICML 2019). temperature 0: the k
    highest scores; a large one: uniform."""
    n = allowed.sum(1, keepdim=True).clamp(min=1)
    scores = scores.float().masked_fill(~allowed, 0)
    mean = scores.sum(1, keepdim=True) / n
    std = (((scores - mean) * allowed) ** 2).sum(1, keepdim=True).div(n).sqrt()
    z = (scores - mean) / (std + 1e-6)
    if temperature > 0:
        uniform = torch.rand(z.shape, generator=generator, device=z.device)
        z = z / temperature - torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
    return top_fraction(z, allowed, fraction)


def gradcam(cross_probs, cross_grads, n_special=1):
    """ALBEF's grounding signal (its Grounding.py), per text token: the cross-attention
    probabilities (B, heads, L, M) times the score's gradient w.r.t. them, clamped at 0, mean over
    heads, summed over the patches (the image's [CLS] and other special tokens left out).
    -> (B, L) in float32 (bf16 would tie neighbouring tokens)."""
    cam = cross_grads.float().clamp(min=0) * cross_probs.float()
    return cam.mean(1)[..., n_special:].sum(-1)


@torch.no_grad()
def rewrite(ids, chosen, gen_logits, special_ids):
    """Replace the chosen tokens (B, L) by samples from the generator's logits (B, L, V) at
    temperature 1 (not argmax: plausible words, often wrong for this image; never a special
    token). -> (corrupted ids (B, L), consistency labels (B, L) float: 1 where the token equals the
    original, including a chosen token re-drawn as itself)."""
    logits = gen_logits[chosen].float().index_fill(-1, special_ids, -math.inf)  # (n_chosen, V)
    corrupted = ids.masked_scatter(chosen, torch.distributions.Categorical(logits=logits).sample())
    return corrupted, (corrupted == ids).float()


def prune_patches(image_embeds, patch_scores, keep):
    """E-PITC: keep the image's special tokens ([CLS]) and the ceil(keep * N) patches with the
    highest scores (B, N). (B, n_special + N, Dv) -> (B, n_special + k, Dv)."""
    B, N = patch_scores.shape
    n_special = image_embeds.shape[1] - N
    special = torch.arange(n_special, device=image_embeds.device).expand(B, -1)
    top = patch_scores.topk(math.ceil(keep * N), dim=1).indices + n_special    # (B, k)
    index = torch.cat([special, top], 1)
    return image_embeds.gather(1, index[..., None].expand(-1, -1, image_embeds.shape[-1]))


@contextmanager
def eval_mode(module):
    """Run the block with `module` in eval mode (no dropout), then restore its mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


# ------------------------------------------------------------------------ the model: ALBEF + EPIC

class AlbefEpic(nn.Module):
    """The student ALBEF, its momentum teacher, the feature queues, and (unless --epic none) EPIC's
    generator and consistency head. forward(batch) -> the training losses."""

    def __init__(self, cfg, vision_hf, text_hf, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.student = ALBEF(cfg, vision_hf, text_hf)
        # EMA copy, never trained by gradients. It follows the student's train / eval mode, as
        # ALBEF's momentum model does (its Pretrain.py trains with dropout 0.1 in both; the
        # built-in backbones have no dropout)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        queue_shape = (cfg.queue_size, cfg.embed_dim)
        self.register_buffer('image_queue', F.normalize(torch.randn(queue_shape), dim=-1))
        self.register_buffer('text_queue', F.normalize(torch.randn(queue_shape), dim=-1))
        # image ids, then caption text keys
        self.register_buffer('id_queue', torch.full((cfg.queue_size,), -1, dtype=torch.long))
        self.register_buffer('key_queue', torch.full((cfg.queue_size,), -1, dtype=torch.long))
        self.register_buffer('queue_ptr', torch.zeros((), dtype=torch.long))
        self.tokenizer = tokenizer
        self.register_buffer('special_ids', torch.tensor(sorted(tokenizer.all_special_ids)))
        self.mask_id, self.cls_id = tokenizer.mask_token_id, tokenizer.cls_token_id
        if cfg.epic != 'none':
            self.generator = Generator(cfg, text_hf)
            # itc_head: D_i = sigmoid(logit_i)
            self.consistency_head = nn.Linear(text_hf.config.hidden_size, 1)

    @torch.no_grad()
    def momentum_update(self):
        for p_t, p_s in zip(self.teacher.parameters(), self.student.parameters()):
            p_t.mul_(self.cfg.momentum).add_(p_s.detach(), alpha=1 - self.cfg.momentum)

    @torch.no_grad()
    def enqueue(self, image_feat, text_feat, image_id, text_key):
        # gathered (W*B, ...) from every rank
        n, ptr = len(image_feat), int(self.queue_ptr)
        for queue, new in ((self.image_queue, image_feat), (self.text_queue, text_feat),
                           (self.id_queue, image_id), (self.key_queue, text_key)):
            queue[ptr:ptr + n] = new
        self.queue_ptr.fill_((ptr + n) % self.cfg.queue_size)

    def candidates(self, ids, mask):
        # (B, L) -> bool: real words (not PAD / CLS / SEP / other specials)
        return mask.bool() & ~torch.isin(ids, self.special_ids)

    def forward(self, batch, alpha, hardness=1.0, update_teacher=True):
        """-> the losses. update_teacher: take the EMA step first (once per optimizer step: the
        first micro-batch under --grad_accum)."""
        cfg, S, T = self.cfg, self.student, self.teacher
        images, ids, mask = batch['image'], batch['input_ids'], batch['attention_mask']
        B = len(ids)
        with torch.no_grad():
            S.temp.clamp_(0.001, 0.5)
        image_embeds = S.encode_image(images)                                   # (B, 1+N, Dv)
        text_embeds = S.encode_text(ids, mask)                                  # (B, L, Dt)
        image_feat = S.image_feature(image_embeds)                              # (B, E)
        text_feat = S.text_feature(text_embeds)                                 # (B, E)

        # ---- ITA: online features against [momentum features of the global batch ; queue],
        # distilled targets
        with torch.no_grad():
            if update_teacher:
                self.momentum_update()
            text_embeds_m, patch_scores = T.encode_text(ids, mask), None
            if cfg.prune_keep < 1:  # E-PITC ranks patches by the teacher ViT's [CLS] attention
                image_embeds_m, patch_scores = T.encode_image_ranked(images)    # (B, N) scores
            else:
                image_embeds_m = T.encode_image(images)
            image_feat_m = T.image_feature(image_embeds_m)
            text_feat_m = T.text_feature(text_embeds_m)
            to_gather = (image_feat_m, text_feat_m, batch['image_id'], batch['text_key'])
            gathered = [common.all_gather(x) for x in to_gather]
            image_bank = torch.cat([gathered[0], self.image_queue])             # (W*B + Q, E)
            text_bank = torch.cat([gathered[1], self.text_queue])
            bank_id = torch.cat([gathered[2], self.id_queue])
            bank_key = torch.cat([gathered[3], self.key_queue])
            positives = positive_mask(batch['image_id'], batch['text_key'], bank_id, bank_key,
                                      cfg.multi_positive)                       # (B, W*B + Q)
            i2t_targets = ita_targets(image_feat_m @ text_bank.T / S.temp, positives, alpha)
            t2i_targets = ita_targets(text_feat_m @ image_bank.T / S.temp, positives, alpha)
        sim_i2t = image_feat @ text_bank.T / S.temp                             # (B, W*B + Q)
        sim_t2i = text_feat @ image_bank.T / S.temp                             # (B, W*B + Q)
        loss_i2t = soft_cross_entropy(sim_i2t, i2t_targets)
        loss_t2i = soft_cross_entropy(sim_t2i, t2i_targets)
        loss_ita = (loss_i2t + loss_t2i) / 2

        # ---- ITM: the positive pair, a hard negative image per text and a hard negative text
        # per image
        own = own_columns(B)
        with torch.no_grad():
            # (B images, B texts): no negatives
            true = positives[:, own].bool()
            if 'true_pairs' in batch:  # ShapesWorld only, not ALBEF: the grammar decides
                true |= batch['true_pairs']
            t2i_own = hardness * sim_t2i[:, own].float()                    # (B texts, B images)
            neg_image = sample_negatives(t2i_own, true.T)                   # (B,) for each text
            i2t_own = hardness * sim_i2t[:, own].float()                    # (B images, B texts)
            neg_text = sample_negatives(i2t_own, true)                      # (B,) for each image
        itm_text = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]])  # (3B, L, Dt)
        itm_mask = torch.cat([mask, mask, mask[neg_text]])
        itm_image = torch.cat([image_embeds, image_embeds[neg_image], image_embeds])
        itm_logits = S.itm_head(S.fuse(itm_text, itm_mask, itm_image)[:, 0])
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ---- MLM with the teacher's distribution distilled in
        vocab_size = S.mlm_head.decoder.out_features
        masked_ids, labels = mask_tokens(ids, self.candidates(ids, mask), self.mask_id,
                                         self.special_ids, vocab_size, cfg.mlm_prob)
        masked_text = S.encode_text(masked_ids, mask)
        logits = S.mlm_head(S.fuse(masked_text, mask, image_embeds))            # (B, L, V)
        with torch.no_grad():
            logits_m = T.mlm_head(T.fuse(T.encode_text(masked_ids, mask), mask, image_embeds_m))
        loss_mlm = distilled_mlm_loss(logits, logits_m, labels, alpha)
        losses = dict(ita=loss_ita, itm=loss_itm, mlm=loss_mlm)

        if cfg.epic != 'none':
            losses.update(self.epic_losses(batch, image_embeds, text_embeds_m, image_embeds_m,
                                           patch_scores))
        losses['loss'] = loss_mlm + loss_ita + loss_itm
        if cfg.epic != 'none':  # EPIC's total: + lambda_itc * L_itc + L_gen
            losses['loss'] = losses['loss'] + cfg.lambda_itc * losses['itc'] + losses['gen']
        # every micro-batch: its momentum features are new negatives, as a step's would be
        self.enqueue(gathered[0], gathered[1], gathered[2], gathered[3])
        return losses

    @torch.compiler.disable  # random draws over symbolic shapes fail under torch.compile
    def choose_rewrites(self, words, saliency=None, generator=None):
        """EPIC's tokens to rewrite, (B, L) bool: ceil(mask_ratio * n) of each caption's words,
        drawn by saliency at --mask_temperature, or uniformly (--epic random: saliency=None)."""
        if saliency is not None:
            return sample_tokens(saliency, words, self.cfg.mask_ratio, self.cfg.mask_temperature,
                                 generator)
        uniform = torch.rand(words.shape, generator=generator, device=words.device)
        return top_fraction(uniform, words, self.cfg.mask_ratio)

    def epic_losses(self, batch, image_embeds, text_embeds_m, image_embeds_m, patch_scores=None):
        """Salient tokens -> masked -> the generator samples replacements (L_gen) -> the
        consistency head labels every token of the corrupted caption consistent or not, against
        the image (L_itc); with --prune_keep < 1 that pass sees only the top patches."""
        cfg, S = self.cfg, self.student
        ids, mask = batch['input_ids'], batch['attention_mask']
        # (B, L) maskable tokens
        words = self.candidates(ids, mask)
        with torch.no_grad():
            saliency = (self.saliency(ids, mask, image_embeds_m, text_embeds_m)
                        if cfg.epic == 'saliency' else None)
            chosen = self.choose_rewrites(words, saliency)                      # (B, L)
        gen_logits = self.generator(S.embeddings(ids.masked_fill(chosen, self.mask_id)), mask,
                                    S.embeddings.word.weight)                   # (B, L, V)
        loss_gen = F.cross_entropy(gen_logits[chosen], ids[chosen])
        corrupted, consistent = rewrite(ids, chosen, gen_logits.detach(), self.special_ids)
        context = (image_embeds if patch_scores is None
                   else prune_patches(image_embeds, patch_scores, cfg.prune_keep))
        fused = S.fuse(S.encode_text(corrupted, mask), mask, context)           # (B, L, Dt)
        itc_logits = self.consistency_head(fused).squeeze(-1)                   # (B, L)
        # every token but [CLS] and pads
        labelled = mask.bool() & (ids != self.cls_id)
        loss_itc = F.binary_cross_entropy_with_logits(itc_logits[labelled], consistent[labelled])
        return dict(itc=loss_itc, gen=loss_gen, replaced=1 - consistent[words].mean().detach())

    @torch.compiler.disable  # Grad-CAM differentiates w.r.t. attention maps: eager only
    @torch.no_grad()
    def saliency(self, ids, mask, image_embeds_m, text_embeds_m=None):
        """(B, L) how much each token's match with *this* image rests on the image, by the teacher
        (no gradient reaches the student).
        gradcam: Grad-CAM of the teacher's ITM match logit on the cross-attention of fusion layer
        --gradcam_layer (gradient x attention, clamped at 0, mean over heads, summed over patches).
        necessity: CE(token | caption with it masked, no image) - CE(token | same, with the
        image)."""
        T = self.teacher
        with eval_mode(T):  # as ALBEF's Grounding.py: dropout would zero part of the maps
            if self.cfg.saliency == 'gradcam':
                if text_embeds_m is None:
                    text_embeds_m = T.encode_text(ids, mask)
                with torch.enable_grad():  # the image's keys put the attention maps in a graph
                    image = image_embeds_m.detach().requires_grad_()
                    fused, attns = T.fuse(text_embeds_m, mask, image, return_attn=True)
                    cross_probs = attns[self.cfg.gradcam_layer][1]                  # (B, H, L, 1+N)
                    itm_score = T.itm_head(fused[:, 0])[:, 1].sum()
                    cross_grads, = torch.autograd.grad(itm_score, cross_probs)
                return gradcam(cross_probs, cross_grads, T.visual_encoder.n_special)  # (B, L)
            B, L = ids.shape
            eye = torch.eye(L, dtype=torch.bool, device=ids.device)
            # (B*L, L): copy j masks token j
            masked = ids[:, None].masked_fill(eye, self.mask_id).flatten(0, 1)
            rep_mask = mask.repeat_interleave(L, 0)
            text = T.encode_text(masked, rep_mask)
            ce = []
            for image in (None, image_embeds_m.repeat_interleave(L, 0)):
                fused = T.fuse(text, rep_mask, image).view(B, L, L, -1)            # (B, copy, L, D)
                hidden = fused[:, torch.arange(L), torch.arange(L)]                 # (B, L, D)
                logits = T.mlm_head(hidden).flatten(0, 1).float()                   # (B*L, V)
                ce.append(F.cross_entropy(logits, ids.flatten(), reduction='none'))
            return (ce[0] - ce[1]).view(B, L)

# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def encode_texts(albef, tokenizer, texts, cfg, device):
    """Texts -> ids, mask (N, L), text-encoder output (N, L, Dt), ITA features (N, E); one padded
    length."""
    enc = tokenizer(texts, padding='longest', truncation=True, max_length=cfg.max_len,
                    return_tensors='pt').to(device)
    step = 4 * cfg.batch_size
    embeds = torch.cat([albef.encode_text(enc.input_ids[s:s + step], enc.attention_mask[s:s + step])
                        for s in range(0, len(texts), step)])
    return enc, embeds, albef.text_feature(embeds)


@torch.no_grad()
def rerank(albef, sims, image_embeds, text_embeds, text_mask, k, query_is_image, chunk):
    """ALBEF's retrieval: each query's top-k candidates by ITA similarity (Q, C) re-scored by the
    ITM head, the others left at -100. -> (Q, C) scores."""
    scores = torch.full_like(sims, -100.0)
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices                       # (Q, k)
    for s in range(0, len(sims), chunk):
        chunk_rows = torch.arange(s, min(s + chunk, len(sims)), device=sims.device)
        query = chunk_rows.repeat_interleave(top.shape[1])
        cand = top[s:s + chunk].flatten()
        image, text = (query, cand) if query_is_image else (cand, query)
        itm_scores = albef.itm_logit(image_embeds[image], text_embeds[text], text_mask[text])
        scores[query, cand] = itm_scores.float()
    return scores


def compositional_metrics(model, cfg, tokenizer, split, world, image_embeds):
    """swap_acc: the ITM score of (image, true caption) beats (image, the caption with one word
    swapped), overall and per attribute. itc_auroc: the consistency head's inconsistency 1 - D_i
    flags the swapped word among the tokens of the swapped captions."""
    S, device = model.student, image_embeds.device
    pairs = world.swap_pairs(split, len(image_embeds), cfg.seed)
    index = torch.tensor([p[0] for p in pairs], device=device)
    true_enc, true_embeds, _ = encode_texts(S, tokenizer, [p[1] for p in pairs], cfg, device)
    swap_enc, swap_embeds, _ = encode_texts(S, tokenizer, [p[2] for p in pairs], cfg, device)
    step, won, inconsistency = 4 * cfg.batch_size, [], []
    for s in range(0, len(pairs), step):
        image = image_embeds[index[s:s + step]]
        true_score = S.itm_logit(image, true_embeds[s:s + step],
                                 true_enc.attention_mask[s:s + step])
        fused = S.fuse(swap_embeds[s:s + step], swap_enc.attention_mask[s:s + step], image)
        won.append(true_score > S.itm_head(fused[:, 0])[:, 1])
        if cfg.epic != 'none':
            itc_logits = model.consistency_head(fused).squeeze(-1).float()
            inconsistency.append(1 - torch.sigmoid(itc_logits))
    won = torch.cat(won).cpu()
    out = dict(swap_acc=100 * won.float().mean().item())
    for attribute in ATTRIBUTE_WORDS:
        chosen = torch.tensor([p[3] == attribute for p in pairs])
        out[f'swap_acc_{attribute}'] = 100 * won[chosen].float().mean().item()
    if cfg.epic != 'none':
        swapped_token = torch.tensor([[w == p[4] for w in swap_enc.word_ids(b)]
                                      for b, p in enumerate(pairs)])
        words = model.candidates(swap_enc.input_ids, swap_enc.attention_mask).cpu()
        inconsistency = torch.cat(inconsistency).cpu()
        out['itc_auroc'] = common.auroc(inconsistency[words], swapped_token[words].long())
    return out


def one_visual_word(ids, visual, generator):
    """(B, L) -> bool mask of one visual word per caption, drawn uniformly (none in a caption
    without one)."""
    uniform = torch.rand(ids.shape, generator=generator, device=ids.device)
    return top_fraction(uniform, visual, 1e-9)                 # ceil(1e-9 * n) = 1 of n words


def modality_metrics(model, cfg, enc, image_embeds, txt2img, generator):
    """EPIC's modality bias, measured: one visual word per caption masked, the student's MLM
    predicts it with the caption's own image (mlm_acc) and with the next test image
    (mlm_acc_shuffled); modality_gap = their difference, what the image adds. A model that
    recovers the word from the rest of the caption alone has no gap."""
    S, ids, mask = model.student, enc.input_ids, enc.attention_mask
    visual = torch.isin(ids, visual_token_ids(model.tokenizer).to(ids.device))
    picked = one_visual_word(ids, visual & model.candidates(ids, mask), generator)    # (T, L)
    if not picked.any():  # no visual word in any caption
        return {}
    masked, hits, step = ids.masked_fill(picked, model.mask_id), [0, 0], 4 * cfg.batch_size
    for s in range(0, len(ids), step):
        rows = slice(s, s + step)
        text = S.encode_text(masked[rows], mask[rows])
        for k, images in enumerate((txt2img[rows], (txt2img[rows] + 1) % len(image_embeds))):
            fused = S.fuse(text, mask[rows], image_embeds[images])              # (b, L, Dt)
            predicted = S.mlm_head(fused[picked[rows]]).argmax(-1)              # (words,)
            hits[k] += (predicted == ids[rows][picked[rows]]).sum().item()
    mlm_acc, mlm_acc_shuffled = (100 * h / picked.sum().item() for h in hits)
    return dict(mlm_acc=mlm_acc, mlm_acc_shuffled=mlm_acc_shuffled,
                modality_gap=mlm_acc - mlm_acc_shuffled)


def draw_tokens(model, cfg, tokenizer, dataset, world, image_embeds, image_embeds_m, path):
    """PNG of test image 0: its first caption shaded by the teacher's saliency (red: the tokens
    EPIC masks); then the generator's rewrite of it and a one-word swap, each shaded by the
    consistency head's inconsistency 1 - D_i (red: the tokens that were changed)."""
    S, device = model.student, image_embeds.device
    enc = tokenizer([dataset.texts[dataset.img2txt[0][0]]], return_tensors='pt').to(device)
    ids, mask = enc.input_ids, enc.attention_mask                               # (1, L)
    words = model.candidates(ids, mask)
    saliency = model.saliency(ids, mask, image_embeds_m).float()               # (1, L)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    chosen = model.choose_rewrites(words, None if cfg.epic == 'random' else saliency, generator)
    saliency, words = saliency[0], words[0]
    lowest, highest = saliency[words].min(), saliency[words].max()
    saliency = (saliency - lowest) / (highest - lowest + 1e-9)

    def row(label, ids, values, marked):
        # the real words of ids (1, L), with per-token values and marks
        keep = model.candidates(ids, torch.ones_like(ids))[0]
        return label, [(t, float(values[i]), bool(marked[i])) for i, t in
                       enumerate(tokenizer.convert_ids_to_tokens(ids[0])) if keep[i]]

    rows = [row(f'teacher saliency, {cfg.saliency} (red: rewritten by EPIC)', ids, saliency,
                chosen[0])]
    if cfg.epic != 'none':
        masked_embeds = S.embeddings(ids.masked_fill(chosen, model.mask_id))   # (1, L, D)
        gen_logits = model.generator(masked_embeds, mask, S.embeddings.word.weight)
        rewritten, _ = rewrite(ids, chosen, gen_logits, model.special_ids)
        rewrites = [('generator rewrite: inconsistency 1 - D (red: changed)', rewritten,
                     (rewritten != ids)[0])]
        if world is not None:
            _, _, swapped, attribute, word = world.swap_pairs('test', 1, cfg.seed)[0]
            swap_enc = tokenizer([swapped], return_tensors='pt').to(device)
            rewrites.append((f'{attribute} swap: inconsistency 1 - D (red: swapped)',
                             swap_enc.input_ids, [w == word for w in swap_enc.word_ids(0)]))
        for label, new_ids, changed in rewrites:
            ones = torch.ones_like(new_ids)
            fused = S.fuse(S.encode_text(new_ids, ones), ones, image_embeds)
            itc_logits = model.consistency_head(fused)[0, :, 0].float()        # (L,)
            rows.append(row(label, new_ids, 1 - torch.sigmoid(itc_logits), changed))
    common.render_tokens(dataset[0]['image'], rows, str(path),
                         title=f'{METHOD} --epic {cfg.epic}: test image 0',
                         mark_label='masked / changed')


@torch.no_grad()
def evaluate(model, cfg, split, run, world, png=None):
    """Retrieval with ITM re-ranking (and ita_rmean: the ITA similarities alone), the MLM's
    modality gap on visual words; on ShapesWorld also swap_acc (+ per attribute), itc_auroc,
    saliency_auroc and rewritten_visual_frac (% of the tokens EPIC's rule rewrites that are visual
    words; with --epic none, the saliency rule's); optionally the PNG. Runs the student (and the
    teacher for saliency), under the run's autocast."""
    tokenizer = model.tokenizer
    model.eval()
    S, T, device = model.student, model.teacher, run.device
    dataset = build_dataset(cfg, split, world, max_images=cfg.eval_images)
    with run.autocast():
        image_embeds, image_embeds_m = [], []
        collate_fn = partial(collate, tokenizer=tokenizer, max_len=cfg.max_len)
        for batch in eval_loader(dataset, cfg.batch_size, collate_fn, cfg.num_workers):
            images = batch['image'].to(device)
            image_embeds.append(S.encode_image(images))
            image_embeds_m.append(T.encode_image(images))
        image_embeds = torch.cat(image_embeds)                                  # (I, 1+N, Dv)
        image_embeds_m = torch.cat(image_embeds_m)                              # (I, 1+N, Dv)
        enc, text_embeds, text_feat = encode_texts(S, tokenizer, dataset.texts, cfg, device)
        sims = S.image_feature(image_embeds) @ text_feat.T                      # (I, T) ITA
        chunk = max(1, 4 * cfg.batch_size // cfg.k_test)
        text_mask = enc.attention_mask
        i2t = rerank(S, sims, image_embeds, text_embeds, text_mask, cfg.k_test, True, chunk)
        t2i = rerank(S, sims.T, image_embeds, text_embeds, text_mask, cfg.k_test, False, chunk)
        metrics = common.retrieval_metrics(i2t, dataset.img2txt, dataset.texts, sims_t2i=t2i)
        ita_only = common.retrieval_metrics(sims, dataset.img2txt, dataset.texts)  # no re-ranking
        metrics['ita_rmean'] = ita_only['rmean']
        txt2img = torch.tensor(dataset.txt2img, device=device)
        generator = torch.Generator(device).manual_seed(cfg.seed)  # the same draws every eval
        metrics.update(modality_metrics(model, cfg, enc, image_embeds, txt2img, generator))
        if world is not None:
            metrics.update(compositional_metrics(model, cfg, tokenizer, split, world, image_embeds))
            saliency = []
            for s in range(0, len(txt2img), 256):
                rows = slice(s, s + 256)
                saliency.append(model.saliency(enc.input_ids[rows], enc.attention_mask[rows],
                                               image_embeds_m[txt2img[rows]]))
            saliency = torch.cat(saliency)
            words = model.candidates(enc.input_ids, enc.attention_mask)
            visual = torch.isin(enc.input_ids, visual_token_ids(tokenizer).to(device))
            metrics['saliency_auroc'] = common.auroc(saliency[words], visual[words].long())
            chosen = model.choose_rewrites(words, None if cfg.epic == 'random' else saliency,
                                           generator)
            rewritten_visual = (chosen & visual).sum().item() / chosen.sum().item()
            metrics['rewritten_visual_frac'] = 100 * rewritten_visual
        if png:
            draw_tokens(model, cfg, tokenizer, dataset, world,
                        image_embeds[:1], image_embeds_m[:1], png)
    model.train()
    return metrics


@torch.no_grad()
def predict(model, cfg, run):
    """--predict: for each image file, every --captions text with the student's ITA similarity
    (as evaluate() computes it) and its ITM match probability (the softmax of the ITM head on the
    fused pair, whose match logit rerank() scores by), sorted by ITM."""
    captions = read_captions(cfg.captions)
    if not captions:
        raise UserError("--predict ranks captions for each image: pass --captions 'a red circle' "
                        "'a blue square' (or one .txt file of them, one per line)")
    images = [read_image(path, cfg.image_size) for path in cfg.predict]  # all readable, first
    model.eval()
    S, device, step = model.student, run.device, 4 * cfg.batch_size
    with run.autocast():
        cleaned = [pre_caption(c) for c in captions]  # as the captions of training and evaluate()
        enc, text_embeds, text_feat = encode_texts(S, model.tokenizer, cleaned, cfg, device)
        for path, image in zip(cfg.predict, images):
            image_embeds = S.encode_image(image[None].to(device))              # (1, 1+N, Dv)
            ita = (S.image_feature(image_embeds) @ text_feat.T)[0].tolist()     # C similarities
            itm = []
            for s in range(0, len(captions), step):
                text, mask = text_embeds[s:s + step], enc.attention_mask[s:s + step]
                fused = S.fuse(text, mask, image_embeds.expand(len(text), -1, -1))  # (c, L, Dt)
                itm += S.itm_head(fused[:, 0]).float().softmax(-1)[:, 1].tolist()  # P(match)
            print(path)
            for c in sorted(range(len(captions)), key=lambda c: (-itm[c], -ita[c])):
                print(f"  itm {itm[c]:.2f}  ita {ita[c]:.2f}  {captions[c]}")


# ----------------------------------------------------------------------------- training loop

def build_optimizer(model, cfg):
    """One AdamW. The temperature is its own group at lr temp_lr (ALBEF's 1e-4, whatever --lr):
    stepped at the shapes preset's 1e-3, a raw temperature of 0.07 falls to 0.019 in 400 steps
    (0.058 at 1e-4) and retrieval is ~6 rmean worse (README). The generator and the consistency
    head are their own groups too."""
    groups = common.param_groups(model.student, cfg.weight_decay, exclude=[model.student.temp])
    temp_group = dict(params=[model.student.temp], weight_decay=0.0, lr_scale=cfg.temp_lr / cfg.lr)
    groups.append(temp_group)
    if cfg.epic != 'none':
        groups += common.param_groups(model.generator, cfg.weight_decay) + \
                  common.param_groups(model.consistency_head, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv, stem=METHOD)
    check_config(cfg)
    run = common.setup(cfg)
    out = Path(cfg.out_dir)
    if cfg.queue_size % (cfg.batch_size * run.world_size):
        raise UserError(f"--queue_size {cfg.queue_size} must be a multiple of the global batch "
                        f"{cfg.batch_size} x {run.world_size} processes "
                        f"(the queue advances by whole batches)")
    world = ShapesWorld(seed=0, image_size=cfg.image_size) if cfg.data == 'shapes' else None
    if not cfg.predict:  # --predict reads no data set
        build_dataset(cfg, 'test', world, max_images=1)  # fail early on a bad path or file
    tokenizer = backbones.load_tokenizer(cfg.text_backbone)
    vision = backbones.load_backbone(cfg.vision_backbone, 'vision')
    text = backbones.load_backbone(cfg.text_backbone, 'mlm')
    model = AlbefEpic(cfg, vision, text, tokenizer).to(run.device)
    if run.is_main:
        albef_params = backbones.count_params(model.student, True)
        epic_params = backbones.count_params(model, True) - albef_params
        print(f"{METHOD}: {albef_params / 1e6:.1f}M trainable ALBEF parameters, "
              f"{epic_params / 1e6:.1f}M in EPIC's generator and consistency head")
    if cfg.predict:
        common.load_into(cfg.init_from, METHOD, model, flags=SHAPE_FLAGS)
        if run.is_main:
            predict(model, cfg, run)
        return
    if cfg.eval_only:
        common.load_into(cfg.init_from or out / 'ckpt.pt', METHOD, model, flags=SHAPE_FLAGS)
        if run.is_main:
            metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
            print(common.write_metrics(cfg, metrics))
        return

    optimizer = build_optimizer(model, cfg)
    # per-rank streams from here; a resumed run then restores its saved ones
    common.seed_rank(cfg, run)
    start = 0
    if cfg.resume:
        start = common.load_into(out / 'ckpt.pt', METHOD, model, optimizer, SHAPE_FLAGS)['step']
    elif cfg.init_from:  # weights only: fine-tune a pre-trained model
        common.load_into(cfg.init_from, METHOD, model, flags=SHAPE_FLAGS)
    train_set = build_dataset(cfg, 'train', world)
    batch_stream = partial(train_batches, train_set, cfg.batch_size,
                           partial(collate, tokenizer=tokenizer, max_len=cfg.max_len), cfg.seed,
                           num_workers=cfg.num_workers, rank=run.rank, world_size=run.world_size,
                           max_bad_images=cfg.max_bad_images)
    batches = batch_stream(start_step=start * cfg.grad_accum)
    trainable = common.wrap_ddp(torch.compile(model) if cfg.compile else model, run)
    logger = common.Logger(cfg, run, start)
    # for MFU, on another copy of the data
    fresh_batch = lambda: common.to_device(pair_labels(next(batch_stream()), world), run.device)
    one_step = lambda: model(fresh_batch(), cfg.alpha, 1.0)['loss']  # on another copy of the data
    with logger.paused():  # one step's FLOPs, for mfu (CUDA only)
        logger.flops_per_sample = common.count_flops(one_step, model, cfg.batch_size, run)
    model.train()
    for step in range(start, cfg.max_steps):
        lr = common.lr_at(step, cfg)
        common.set_lr(optimizer, lr)
        alpha = cfg.alpha * min(1.0, step / max(1, cfg.alpha_warmup_steps))
        hardness = min(1.0, step / cfg.hard_negative_warmup) if cfg.hard_negative_warmup else 1.0
        for micro in range(cfg.grad_accum):
            if run.distributed:  # sync gradients on the last micro-batch only
                trainable.require_backward_grad_sync = micro == cfg.grad_accum - 1
            batch = common.to_device(pair_labels(next(batches), world), run.device)
            with run.autocast():
                losses = trainable(batch, alpha, hardness, update_teacher=micro == 0)
            common.check_finite(losses['loss'], step, cfg)
            (losses['loss'] / cfg.grad_accum).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        logger.step(step, {k: v.item() for k, v in losses.items()}, lr)
        validate = cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps
        if validate or step + 1 == cfg.max_steps:
            with logger.paused():
                if validate and run.is_main:
                    val = evaluate(model, cfg, 'val', run, world)
                    logger.log(dict(step=step + 1, **{f'val_{k}': v for k, v in val.items()}))
                if run.is_main:
                    common.save_checkpoint(out / 'ckpt.pt', METHOD, model, optimizer, step + 1, cfg)
    if run.is_main:
        metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
        print(common.write_metrics(cfg, {**metrics, **logger.speed()}))
    logger.close()
    trainable = None  # DDP's reducer goes before the process group
    common.teardown(run)


if __name__ == '__main__':
    common.main_guard(main)
