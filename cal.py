"""
cal.py — a LLaVA-style vision-language model trained with CAL (Contrastive ALignment).

Paper: "Seeing the Image: Prioritizing Visual Correlation by Contrastive Alignment", Xiao et al.,
       NeurIPS 2024, arXiv 2405.17871 (code: foundation-multimodal-models/CAL, on LLaVA).
       Decisions: specs/cal.md.

The idea in three sentences. A LLaVA-style model feeds a frozen vision tower's patch features
through a small projector into a causal LLM as tokens, and learns to write the answer (a caption, or
the answer to a question) by next-token cross-entropy. Not every answer token needs the image: CAL
runs the LLM once more without the image and measures, for each answer token, how much the image
raised the logit of the right next token (Δo). Clamped to [1, 5] and smoothed over neighbouring
tokens, that gain re-weights each token's loss, so the tokens the image explains count more and the
ones it contradicts (noisy labels) count as little as the rest.

    python cal.py                          # ShapesWorld, stage 1 then stage 2, with CAL, CPU
    python cal.py --cal false              # the baseline: plain next-token loss
    python cal.py --caption_noise 0.3      # 30% of training captions / answers wrong in one word
    python cal.py --data coco --data_root /data/coco  # CLIP ViT-L/14-336 + Qwen2.5-0.5B-Instruct,
                                                      # LLaVA-1.5 recipe
    torchrun --standalone --nproc_per_node=8 cal.py --data coco --data_root /data/coco
    python cal.py --init_from llava-hf/llava-1.5-7b-hf --data coco ...  # CAL's setting: LLaVA-1.5
"""
import itertools
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
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

import backbones
import common
from data import (ATTRIBUTE_WORDS, CELLS, COLORS, NUMBERS, PLURALS, SHAPES, ShapesWorld, UserError,
                  build_dataset, caption_is_true, eval_loader, matches, np_words, position_phrase,
                  read_image, swap, train_batches, visual_token_ids)

METHOD = 'cal'

# ----------------------------------------------------------------------------- config & presets

@dataclass
class Config(common.RunConfig):
    vision_backbone: str = 'shapes-tiny-vision'  # frozen vision tower: HF id, path or built-in name
    lm_backbone: str = 'shapes-tiny-lm'          # causal LM (Qwen2, Llama): HF id, path or built-in
                                                 # (both DIR for a LLaVA --init_from DIR)
    vision_layer: int = -2          # tower hidden state used (LLaVA: the penultimate), CLS dropped
                                    # (a LLaVA release sets it and image_size)
    image_size: int = 64
    stage: str = 'both'             # 1 (projector on captions) | 2 (+ the LLM, captions and
                                    # questions) | both
    stage1_steps: int = 300         # stage 1's steps (max_steps and lr are stage 2's)
    stage1_lr: float = 1e-3         # stage 1's peak lr, LLaVA's (each stage warms up over
                                    # warmup_steps)
    max_len: int = 32               # answer tokens kept per row
    cal: bool = True                # re-weight each answer token by its image logit gain
                                    # (False: plain CE)
    cal_stages: str = '1,2'         # stages CAL applies in (the code: both)
    cal_alpha: float = 1.0          # clamp floor of Δo (α)
    cal_beta: float = 5.0           # clamp ceiling of Δo (β)
    cal_window: int = 3             # average pooling window over neighbouring tokens (stride 1,
                                    # padding not counted)
    cal_pool: str = 'flat'          # flat: over the micro-batch flattened, as the code | sample:
                                    # within each answer
    cal_gain: str = 'logit'         # Δo of the target's logit (the paper's) | logprob: of its
                                    # log-probability (a gain every candidate shares cancels)
    text_only_frac: float = 0.0     # share of stage-2 rows that are captions without the image
                                    # (LLaVA's mix has text-only rows); CAL weight 1
    caption_noise: float = 0.0      # ShapesWorld: fraction of training captions / answers made
                                    # false in one word, by a value absent from the scene
    image_text: str = 'image :'     # text before the image tokens: the image is never first
    caption_prompt: str = 'describe this image .'  # the instruction of caption rows
    max_new_tokens: int = 20        # greedy generation length at evaluation
    eval_images: int = 0            # test images captioned and questioned (0 = all: 1,000 on
                                    # ShapesWorld)
    question: str = ''              # --predict: what to ask of each image (default: the caption
                                    # prompt)
    renamed_flags: ClassVar[dict] = dict(vision_model='vision_backbone', llm='lm_backbone')


REAL = dict(vision_backbone='openai/clip-vit-large-patch14-336',
            lm_backbone='Qwen/Qwen2.5-0.5B-Instruct', image_size=336, stage1_steps=2170,
            stage1_lr=1e-3, max_steps=5200, lr=2e-5, batch_size=16, grad_accum=1, max_len=512,
            warmup_steps=150, weight_decay=0.0, grad_clip=1.0, image_text='Image:',
            caption_prompt='Describe the image briefly.', log_every=20, grad_checkpointing=True)
# LLaVA-1.5: stage 1 global batch 256 x 2,170 steps (558K), stage 2 batch 128 x 5,200 steps (665K).
# Here 16 per GPU x 8 GPUs = 128, stage 2's batch (stage 1 alone at 256: --stage 1 --grad_accum 2).
# Real runs see captions in both stages (LLaVA's instruction mix is not a captions folder).
PRESETS = {'shapes': dict(batch_size=32, stage1_steps=300, max_steps=600, lr=5e-4, warmup_steps=30,
                          weight_decay=0.0, log_every=20),
           'coco': REAL, 'json': REAL, 'flickr30k': REAL}

SHAPE_FLAGS = '--lm_backbone / --vision_backbone / --image_size'  # what a checkpoint must match


def check_config(cfg):
    if cfg.stage not in ('1', '2', 'both') or cfg.cal_pool not in ('flat', 'sample'):
        raise UserError(f"--stage '{cfg.stage}' must be 1, 2 or both and "
                        f"--cal_pool '{cfg.cal_pool}' flat or sample")
    if cfg.cal_gain not in ('logit', 'logprob') or not 0 <= cfg.text_only_frac < 1:
        raise UserError(f"--cal_gain '{cfg.cal_gain}' must be logit or logprob and "
                        f"--text_only_frac ({cfg.text_only_frac}) a share in [0, 1)")
    if cfg.text_only_frac and cfg.stage == '1':
        raise UserError("--text_only_frac mixes text-only rows into stage 2; --stage 1 has none "
                        "(use --stage 2 or both)")
    if not set(cfg.cal_stages.split(',')) <= {'1', '2'}:
        raise UserError(f"--cal_stages '{cfg.cal_stages}' must list stages 1 and/or 2: 1,2 or 2")
    if not 0 < cfg.cal_alpha <= cfg.cal_beta or cfg.cal_window < 1 or cfg.cal_window % 2 == 0:
        raise UserError(f"need 0 < --cal_alpha ({cfg.cal_alpha}) <= --cal_beta ({cfg.cal_beta}) "
                        f"and an odd --cal_window ({cfg.cal_window})")
    if cfg.caption_noise and cfg.data != 'shapes':
        raise UserError("--caption_noise corrupts ShapesWorld's captions (it knows which words are "
                        "wrong); it needs --data shapes")

# ------------------------------------------------------------ data: rows of (image, prompt, answer)

def text_before_image(tokenizer, text):
    """The tokens before the image: `text` with the LM's own start (Llama's <s>, the built-in's
    [CLS]; Qwen adds none), without an end token the tokenizer may append."""
    ids = tokenizer(text).input_ids
    return ids[:-1] if ids and ids[-1] in (tokenizer.eos_token_id, tokenizer.sep_token_id) else ids


def unique_names(obj, scene, exclude):
    """All unique names '[size] [color] (shape|object) [at the POS]' of obj, without `exclude`."""
    names = []
    for use in itertools.product((False, True), repeat=4):  # size, color, shape, position
        if use[('size', 'color', 'shape', 'position').index(exclude)]:
            continue
        np_ = dict(size=obj['size'] if use[0] else None, color=obj['color'] if use[1] else None,
                   shape=obj['shape'] if use[2] else None)
        cell = (obj['row'], obj['col']) if use[3] else None
        if sum(matches(o, np_, cell) for o in scene) == 1:
            words = [np_['size'], np_['color'], np_['shape'] or 'object']
            words += ['at the', position_phrase(*cell)] if cell else []
            names.append(' '.join(w for w in words if w))
    return names


def questions_and_noise(world, split, index):
    """ShapesWorld's questions about one image, for the instruction rows of stage 2 -> (questions,
    noise word indices). questions: [(question, answer, kind)], one per kind in order color,
    shape, size, position, count, yesno (no position if no object can be named without its cell);
    objects get unique names without the asked attribute: 'what color is the large circle ?'.
    With the world's caption_noise p, each *training* color|shape|size|position answer is, with
    probability p, replaced by a wrong one differing in one word and naming a value no object of
    the scene has (a colour, shape or size; an empty cell), whose index is recorded (-1 = clean;
    also when no such value exists, e.g. a size when the scene has both); count and yes/no answers
    never are."""
    scene, rng = world.scene(split, index), world.rng(split, index, 'questions')
    qa = []
    for kind in ('color', 'shape', 'size', 'position'):
        template = 'where is the {} ?' if kind == 'position' else f'what {kind} is the {{}} ?'
        for obj in rng.permutation(scene):
            names = unique_names(obj, scene, exclude=kind)
            if names:
                answer = (position_phrase(obj['row'], obj['col']) if kind == 'position'
                          else obj[kind])
                qa.append((template.format(names[rng.integers(len(names))]), answer, kind))
                break
    obj, counted = scene[rng.integers(len(scene))], rng.integers(3)
    color = obj['color'] if rng.random() < 0.5 else COLORS[rng.integers(len(COLORS))]
    shape = obj['shape'] if rng.random() < 0.5 else SHAPES[rng.integers(len(SHAPES))]
    if counted == 0:
        question, n = 'how many objects are there ?', len(scene)
    elif counted == 1:
        question, n = (f'how many {color} objects are there ?',
                       sum(o['color'] == color for o in scene))
    else:
        question, n = (f'how many {PLURALS[SHAPES.index(shape)]} are there ?',
                       sum(o['shape'] == shape for o in scene))
    qa.append((question, NUMBERS[n], 'count'))
    np_ = f"a {np_words(obj, rng)}"
    if rng.random() < 0.5:  # a 'no' question: one attribute of a real object changed
        np_ = swap(f"a {obj['size']} {obj['color']} {obj['shape']}", scene, 'color', rng)[0]
    qa.append((f"is there {np_} ?", 'yes' if caption_is_true(np_, scene) else 'no', 'yesno'))
    noise = [-1] * len(qa)
    if split == 'train' and world.caption_noise > 0:
        rng = world.rng(split, index, 'answer_noise')
        for j in np.flatnonzero(rng.random(len(qa)) < world.caption_noise):
            question, answer, kind = qa[j]
            if kind in ('count', 'yesno'):
                continue
            words = answer.split()  # wrong answers of the same length that differ in one word
            options = CELLS if kind == 'position' else ATTRIBUTE_WORDS[kind]
            # what the image shows
            taken = {(o['row'], o['col']) if kind == 'position' else o[kind] for o in scene}
            wrong = [w for w in options if len(w.split()) == len(words)
                     and sum(a != b for a, b in zip(w.split(), words)) == 1
                     and (CELLS[w] if kind == 'position' else w) not in taken]
            if not wrong:
                continue
            qa[j] = (question, wrong[rng.integers(len(wrong))], kind)
            noise[j] = next(k for k, w in enumerate(qa[j][1].split()) if w != words[k])
    return qa, noise


class QuestionRows(Dataset):
    """ShapesWorld's questions as rows: item k is question k % 6 of image k // 6 (an image with 5
    questions asks its first again). Items: image, question, answer, kind, noise_word (-1 or the
    wrong word's index)."""

    def __init__(self, world, split, max_images=0):
        self.world, self.split = world, split
        self.n_images = min(world.num_images(split), max_images or world.num_images(split))

    def __len__(self):
        return self.n_images * 6

    def __getitem__(self, k):
        index, j = divmod(k, 6)
        qa, noise = questions_and_noise(self.world, self.split, index)
        question, answer, kind = qa[j % len(qa)]
        image = self.world.transform(self.world.image(self.split, index))
        return dict(image=image, question=question, answer=answer, kind=kind,
                    noise_word=noise[j % len(qa)], image_id=index)


class Mixture(Dataset):
    """Stage 2 on ShapesWorld: captions and questions interleaved one to one (the shorter part
    cycles)."""

    def __init__(self, *parts):
        self.parts, self.n = parts, max(len(p) for p in parts)

    def __len__(self):
        return self.n * len(self.parts)

    def __getitem__(self, k):
        part = self.parts[k % len(self.parts)]
        return part[(k // len(self.parts)) % len(part)]


class TextOnly(Dataset):
    """Rows of which a share `frac` are captions without their image: LLaVA's instruction mix has
    text-only rows, so the LLM keeps the prior that CAL's no-image pass asks it for. Row k is one
    when its own random draw falls below frac (the same rows on every run and rank)."""

    def __init__(self, rows, captions, frac, seed):
        self.rows, self.captions, self.frac, self.seed = rows, captions, frac, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        if np.random.default_rng([self.seed, k]).random() >= self.frac:
            return self.rows[k]
        item = self.captions[k % len(self.captions)]
        return None if item is None else dict(item, image=None)  # None: unreadable, counted


def collate_rows(items, tokenizer, cfg, n_image):
    """Rows -> the LLM's training batch, right-padded:
    [image_text][n_image image slots][prompt][answer][EOS].
    input_ids (B, L) hold pads in the image slots (their embeddings are replaced by the projected
    image); labels (B, L) are -100 except on the answer and its EOS; noise_mask / visual_mask (B, L)
    mark the answer's tokens of word `noise_word` and its visual words (ShapesWorld's study of Δo).
    An item whose image is None is a text-only row (text_only (B,)): its image slot is masked out
    of attention."""
    readable = [item for item in items if item is not None]
    if not readable:
        return dict(n_bad=len(items))
    items, n_bad = readable, len(items) - len(readable)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    before = text_before_image(tokenizer, cfg.image_text)
    prompt_texts = [item.get('question', cfg.caption_prompt) for item in items]
    prompts = tokenizer(prompt_texts, add_special_tokens=False)
    answer_texts = [item.get('answer', item.get('caption')) for item in items]
    answers = tokenizer(answer_texts, add_special_tokens=False)
    rows, spans = [], []
    for b, item in enumerate(items):
        answer = answers.input_ids[b][:cfg.max_len]
        head = before + [pad] * n_image + prompts.input_ids[b]
        rows.append(head + answer + [eos])
        noisy = [w == item.get('noise_word', -1) for w in answers.word_ids(b)]
        spans.append((len(head), answer, noisy))
    B, L = len(rows), max(map(len, rows))
    out = dict(input_ids=torch.full((B, L), pad),
               attention_mask=torch.zeros(B, L, dtype=torch.long),
               labels=torch.full((B, L), -100), noise_mask=torch.zeros(B, L, dtype=torch.bool),
               visual_mask=torch.zeros(B, L, dtype=torch.bool))
    for b, (row, (start, answer, noisy)) in enumerate(zip(rows, spans)):
        out['input_ids'][b, :len(row)] = torch.tensor(row)
        out['attention_mask'][b, :len(row)] = 1
        if items[b]['image'] is None:  # a text-only row: the slot stays, hidden from attention
            out['attention_mask'][b, len(before):len(before) + n_image] = 0
        out['labels'][b, start:len(row)] = torch.tensor(row[start:])
        end = start + len(answer)  # the answer's tokens: [start, end)
        out['noise_mask'][b, start:end] = torch.tensor(noisy[:len(answer)], dtype=torch.bool)
        out['visual_mask'][b, start:end] = torch.isin(torch.tensor(answer),
                                                       visual_token_ids(tokenizer))
    blank = torch.zeros(3, cfg.image_size, cfg.image_size)
    images = torch.stack([blank if item['image'] is None else item['image'] for item in items])
    out.update(image=images, image_start=len(before), n_bad=n_bad,
               text_only=torch.tensor([item['image'] is None for item in items]),
               image_id=torch.tensor([item['image_id'] for item in items]))
    return out

# ----------------------------------------------------------------------------- model

class VLM(nn.Module):
    """Frozen vision tower -> mlp2x_gelu projector -> causal LLM that reads the image as n_image
    input tokens. A LLaVA release brings its trained projector and n_special (llava_from_hf)."""

    def __init__(self, cfg, vision, llm, tokenizer, projector=None, n_special=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.vision = vision.requires_grad_(False)
        Dv, H = vision.config.hidden_size, llm.config.hidden_size
        self.projector = projector or nn.Sequential(nn.Linear(Dv, H), nn.GELU(), nn.Linear(H, H))
        self.llm = llm
        kind = vision.config.model_type  # tokens before the patches: [CLS] (+ DeiT's dist)
        default = 0 if kind.startswith('siglip') else 2 if kind == 'deit' else 1
        self.n_special = default if n_special is None else n_special
        with torch.no_grad():
            blank_image = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
            self.n_image = self.vision_features(blank_image).shape[1]
        # a BOS alone would not do
        if not tokenizer(cfg.image_text, add_special_tokens=False).input_ids:
            raise UserError(f"--image_text '{cfg.image_text}' gives no token; "
                            f"the image must not come first")

    def train(self, mode=True):  # the tower is frozen: no dropout, ever
        super().train(mode)
        self.vision.eval()
        return self

    @torch.no_grad()
    def vision_features(self, images):  # (B, 3, H, W) -> (B, N, Dv) patch features of vision_layer
        outputs = self.vision(pixel_values=images, output_hidden_states=True)
        hidden = outputs.hidden_states[self.cfg.vision_layer]
        return hidden[:, self.n_special:]

    def embed(self, ids, images, start, blind=False):
        """ids (B, L) with image slots at [start, start + N) -> inputs_embeds (B, L, H), the slots
        holding the projected image (zeros when blind: the baseline that shows how much the image
        contributes)."""
        x = self.llm.get_input_embeddings()(ids)                                   # (B, L, H)
        features = self.vision_features(images).to(self.projector[0].weight.dtype)  # (B, N, Dv)
        image = self.projector(features)                                           # (B, N, H)
        image = torch.zeros_like(image) if blind else image
        return torch.cat([x[:, :start], image.to(x.dtype), x[:, start + self.n_image:]], 1)

    def forward(self, ids, images, start, mask):  # -> logits (B, L, V), inputs_embeds (B, L, H)
        x = self.embed(ids, images, start)
        return self.llm(inputs_embeds=x, attention_mask=mask).logits, x

    def logits_without_image(self, x, mask, start):
        """CAL's second pass: the image tokens dropped, every text token at its original position
        (explicit position ids), so text logits equal the code's way (image positions zeroed in the
        2-D attention mask) at N fewer tokens. x (B, L, H) -> logits (B, L - N, V) of the text
        positions in order."""
        before_image = torch.arange(start)
        after_image = torch.arange(start + self.n_image, x.shape[1])
        keep = torch.cat([before_image, after_image]).to(x.device)
        return self.llm(inputs_embeds=x[:, keep], attention_mask=mask[:, keep],
                        position_ids=keep[None].expand(len(x), -1)).logits

    @torch.no_grad()
    def generate(self, images, prompts, blind=False):
        """Greedy answers to one prompt per image -> strings. Batched with left padding
        ([pads][image_text][image][prompt]): a decoder-only model continues each row right after
        its own last token."""
        cfg, tok = self.cfg, self.tokenizer
        rows = [dict(image=image, question=prompt, answer='', image_id=0)
                for image, prompt in zip(images, prompts)]
        batch = collate_rows(rows, tok, cfg, self.n_image)
        # the empty answer's EOS: a pad now
        eos_at = batch['attention_mask'].sum(1, keepdim=True) - 1
        ids = batch['input_ids'].scatter(1, eos_at, tok.pad_token_id)[:, :-1]
        mask = batch['attention_mask'].scatter(1, eos_at, 0)[:, :-1]
        x = self.embed(ids.to(images.device), images, batch['image_start'], blind)
        x, mask = backbones.right_to_left_padding(x, mask.to(images.device))
        # (B, new): the new tokens only; by this rank alone, not waiting on others under FSDP
        new = self.llm.generate(inputs_embeds=x, attention_mask=mask, do_sample=False,
                                max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id, synced_gpus=False)
        return [' '.join(t.split()) for t in tok.batch_decode(new, skip_special_tokens=True)]

# ----------------------------------------------------------------------------- CAL

def log_normaliser(logits):  # (B, T, V) -> (B, T) fp32 log-sum-exp, a row at a time (152k vocab)
    return torch.stack([row.float().logsumexp(-1) for row in logits])


def target_gain(model, x, mask, start, logits, targets, kinds=('logit',)):
    """Δo (B, T) of each kind: 'logit', the raw logit of each true next token with the image
    minus without it (the paper's: not softmax); 'logprob', the same for its log-probability (the
    logit minus the log-sum-exp over the vocabulary, so a gain every candidate shares, as when the
    image only makes the model more confident, cancels). T = L - 1, the shifted positions; fp32;
    only the target logits are gathered, never a second full fp32 logit tensor. -100 targets
    gather token 0, as the code does. Positions inside the image get 0: they carry no loss, and the
    prompt between keeps them out of every answer token's pooling window. -> {kind: (B, T)}"""
    T, N = targets.shape[1], model.n_image
    index = targets.clamp(min=0)[..., None]                              # (B, T, 1)
    # the text positions that predict a next token; in the no-image pass they are its first
    # len(text) positions (its last one predicts past the end, as the full pass's last one does)
    text = torch.cat([torch.arange(start), torch.arange(start + N, T)]).to(x.device)
    without = model.logits_without_image(x, mask, start)[:, :len(text)]  # (B, len(text), V)
    with_image = logits.gather(-1, index).squeeze(-1).float()[:, text]   # (B, len(text))
    no_image = without.gather(-1, index[:, text]).squeeze(-1).float()    # (B, len(text))
    gains = {}
    for kind in kinds:
        gain = with_image - no_image
        if kind == 'logprob':  # minus each pass's own log-sum-exp over the vocabulary
            gain = gain - log_normaliser(logits)[:, text] + log_normaliser(without)
        gains[kind] = torch.zeros(targets.shape, device=x.device).index_copy(1, text, gain)
    return gains


def cal_weights(delta, answer, cfg):
    """Δo (B, T) -> CAL's weights (B, T): clamp to [alpha, beta], then average over a window of
    cal_window tokens (stride 1, padding not counted). flat: over the micro-batch flattened into
    one sequence, every position, as the code does; sample: within each row, over its answer
    tokens only."""
    w = delta.clamp(cfg.cal_alpha, cfg.cal_beta)
    k = cfg.cal_window
    if cfg.cal_pool == 'flat':
        flat = w.reshape(1, 1, -1)  # (1, 1, B*T): the micro-batch as one sequence
        return F.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=False).view_as(w)
    window_sum = lambda t: F.conv1d(t[:, None], torch.ones(1, 1, k, device=t.device),
                                    padding=k // 2)[:, 0]  # (B, T) -> each window's sum (B, T)
    m = answer.float()
    return torch.where(answer, window_sum(w * m) / window_sum(m).clamp(min=1), w)


def answer_loss(model, trainable, batch, cfg, use_cal):
    """Next-token CE on the answer tokens; with CAL weighted by cal_weights of the cal_gain Δo
    (text-only rows: weight 1, no image to weigh by): sum(w * CE) / sum(w over answers).
    -> dict(loss, and with CAL: delta (mean Δo on answers), at_alpha / at_beta (fractions clamped
    there))."""
    mask, labels, start = batch['attention_mask'], batch['labels'], batch['image_start']
    logits, x = trainable(batch['input_ids'], batch['image'], start, mask)  # (B, L, V), (B, L, H)
    # position t predicts token t + 1
    logits = logits[:, :-1]                                                 # (B, T, V)
    targets = labels[:, 1:]                                                 # (B, T)
    answer = targets != -100
    # fp32 CE on the answer positions only (a 152k vocab makes B*T*V big)
    ce = torch.zeros(targets.shape, device=logits.device)
    ce[answer] = F.cross_entropy(logits[answer].float(), targets[answer], reduction='none')
    if not use_cal:
        return dict(loss=ce.sum() / answer.sum())
    with torch.no_grad():
        delta = target_gain(model, x.detach(), mask, start, logits.detach(), targets,
                            kinds=(cfg.cal_gain,))[cfg.cal_gain]            # (B, T)
        w = cal_weights(delta, answer, cfg)                                 # (B, T)
        w[batch['text_only']] = 1.0
    loss = (w * ce).sum() / (w[answer].sum() + 1e-6)
    scored = answer & ~batch['text_only'][:, None]  # the logged Δo: rows with an image
    scored = scored if scored.any() else answer
    return dict(loss=loss, delta=delta[scored].mean(),
                at_alpha=(delta[scored] <= cfg.cal_alpha).float().mean(),
                at_beta=(delta[scored] >= cfg.cal_beta).float().mean())

# ----------------------------------------------------------------------------- evaluation

def question_accuracy(model, cfg, split, device, world):
    """Exact-match accuracy of greedy answers to every question of the split's images (vqa_acc,
    per kind), and the same with the image tokens zeroed (blind_vqa_acc)."""
    questions = QuestionRows(world, split, max_images=cfg.eval_images)
    right, right_blind, kinds = [], [], []
    seen = set()
    for batch in eval_loader(questions, cfg.batch_size, lambda items: items):
        # an image's repeat of its first
        batch = [q for q in batch if (q['image_id'], q['question']) not in seen]
        seen.update((q['image_id'], q['question']) for q in batch)
        if not batch:
            continue
        images = torch.stack([q['image'] for q in batch]).to(device)
        prompts = [q['question'] for q in batch]
        answers = model.generate(images, prompts)
        answers_blind = model.generate(images, prompts, blind=True)
        for q, a, a_blind in zip(batch, answers, answers_blind):
            right.append(a == q['answer'])
            right_blind.append(a_blind == q['answer'])
            kinds.append(q['kind'])
    pct = lambda xs: 100 * sum(xs) / max(len(xs), 1)
    out = dict(vqa_acc=pct(right), blind_vqa_acc=pct(right_blind))
    for kind in (*ATTRIBUTE_WORDS, 'count', 'yesno'):
        out[f'vqa_acc_{kind}'] = pct([r for r, k in zip(right, kinds) if k == kind])
    return out


def noisy_pairs(world, split, indices):
    """The held-out noisy set: per image, its first caption and that caption made false in one word
    by a value the scene lacks (attributes in random order) -> [(index, clean, corrupted, word)]."""
    pairs = []
    for i in indices:
        rng, scene = np.random.default_rng(i), world.scene(split, i)
        caption = world.captions(split, i)[0]
        swaps = (swap(caption, scene, str(attribute), rng, absent=True)
                 for attribute in rng.permutation(list(ATTRIBUTE_WORDS)))
        if swapped := next((s for s in swaps if s), None):  # None: the scene has every value
            pairs.append((i, caption, *swapped))
    return pairs


GAIN_GROUPS = ('corrupt', 'true', 'visual', 'other')


@torch.no_grad()
def gain_study(model, cfg, world, device, split='val'):
    """Δo inspected on the model as it is, before clamping and pooling, on the held-out noisy set:
    its tokens in GAIN_GROUPS, (i) the corrupted word's, (ii) the true word's at the same slot of
    the clean caption, (iii) the clean caption's other visual words', (iv) its non-visual ones'
    (EOS excluded). -> ({kind: {group: (n,) gains}} for kinds logit and logprob, metrics: each
    group's mean, delta_* / logprob_delta_*, and *_auroc_corrupt: how well the gain ranks true
    above corrupted tokens, 50 = chance)."""
    n = min(world.num_images(split), cfg.eval_images or world.num_images(split))
    gains = {kind: {group: [] for group in GAIN_GROUPS} for kind in ('logit', 'logprob')}
    for first in range(0, n, cfg.batch_size):
        pairs = noisy_pairs(world, split, range(first, min(first + cfg.batch_size, n)))
        clean = [dict(image=world.transform(world.image(split, i)), caption=caption,
                      noise_word=word, image_id=i) for i, caption, _, word in pairs]
        corrupted = [dict(item, caption=pair[2]) for item, pair in zip(clean, pairs)]
        for items in (clean, corrupted):
            rows = common.to_device(collate_rows(items, model.tokenizer, cfg, model.n_image),
                                    device)
            mask, start = rows['attention_mask'], rows['image_start']
            logits, x = model(rows['input_ids'], rows['image'], start, mask)
            targets = rows['labels'][:, 1:]
            gain = target_gain(model, x, mask, start, logits[:, :-1], targets, ('logit', 'logprob'))
            slot, visual = rows['noise_mask'][:, 1:], rows['visual_mask'][:, 1:]
            words = (targets != -100) & (targets != model.tokenizer.eos_token_id)
            groups = (dict(true=slot, visual=visual & ~slot, other=words & ~visual)
                      if items is clean else dict(corrupt=slot))
            for kind, group in itertools.product(gain, groups):
                gains[kind][group].append(gain[kind][groups[group]].cpu())
    gains = {kind: {g: torch.cat(v) for g, v in groups.items()} for kind, groups in gains.items()}
    metrics = {}
    for kind, prefix in (('logit', 'delta'), ('logprob', 'logprob_delta')):
        metrics.update({f'{prefix}_{g}': gains[kind][g].mean().item() for g in GAIN_GROUPS})
        true, corrupt = gains[kind]['true'], gains[kind]['corrupt']
        labels = torch.cat([torch.ones(len(true)), torch.zeros(len(corrupt))])
        metrics[f'{prefix}_auroc_corrupt'] = common.auroc(torch.cat([true, corrupt]), labels)
    return gains, metrics


def draw_gain_histogram(gains, cfg, path, bins=48):
    """PNG: the histogram of the logit gain Δo of each of GAIN_GROUPS, a panel each on a shared
    axis (each panel scaled to its own highest bin), the clamp [alpha, beta] marked in red: the
    paper chose its clamp from such a histogram."""
    everything = torch.cat(list(gains.values()))
    lo = min(everything.quantile(0.005).item(), cfg.cal_alpha - 1)
    hi = max(everything.quantile(0.995).item(), cfg.cal_beta + 1)
    W, H, pad = 640, 90, 40
    canvas = Image.new('RGB', (W + 2 * pad, len(gains) * (H + pad) + pad + 8), 'white')
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=12)
    x_of = lambda value: pad + (value - lo) / (hi - lo) * W
    for p, (group, values) in enumerate(gains.items()):
        top = pad + p * (H + pad)
        counts = torch.histc(values.clamp(lo, hi), bins, lo, hi)
        for b, count in enumerate((counts / counts.max().clamp(min=1)).tolist()):
            x0 = pad + b * W / bins
            draw.rectangle((x0, top + H * (1 - count), x0 + W / bins - 1, top + H), fill='blue')
        for bound in (cfg.cal_alpha, cfg.cal_beta):
            draw.line((x_of(bound), top, x_of(bound), top + H), fill='red', width=2)
        draw.line((pad, top + H, pad + W, top + H), fill='black')
        draw.text((pad, top - 16), f'{group}: {len(values)} tokens, mean {values.mean():.2f}',
                  fill='black', font=font)
        for tick in range(math.ceil(lo), math.floor(hi) + 1, max(1, round((hi - lo) / 10))):
            draw.text((x_of(tick) - 4, top + H + 2), str(tick), fill='black', font=font)
    axis = f'delta o, the logit gain, clipped to [{lo:.1f}, {hi:.1f}]; red: the clamp [alpha, beta]'
    draw.text((pad, len(gains) * (H + pad) + 26), axis, fill='black', font=font)
    canvas.save(path)
    return path


@torch.no_grad()
def draw(model, cfg, image, caption, device, path):
    """PNG: test image 0 beside its first reference caption, each token shaded by its CAL weight /
    beta (pooling within the caption), and by Δo itself (clamped to [0, beta], / beta); visual
    words marked."""
    item = dict(image=image, caption=caption, image_id=0)
    rows = collate_rows([item], model.tokenizer, cfg, model.n_image)
    rows = common.to_device(rows, device)
    mask, start = rows['attention_mask'], rows['image_start']
    logits, x = model(rows['input_ids'], rows['image'], start, mask)
    targets = rows['labels'][:, 1:]
    answer = targets != -100
    delta = target_gain(model, x, mask, start, logits[:, :-1], targets,
                        kinds=(cfg.cal_gain,))[cfg.cal_gain]
    w = cal_weights(delta, answer, replace(cfg, cal_pool='sample'))
    tokens = model.tokenizer.convert_ids_to_tokens(targets[answer].tolist())
    marked = rows['visual_mask'][:, 1:][answer].tolist()
    weight_label = (f'CAL weight / {cfg.cal_beta:g} '
                    f'(clamp [{cfg.cal_alpha:g}, {cfg.cal_beta:g}], window {cfg.cal_window})')
    weights = [(t, v / cfg.cal_beta, m) for t, v, m in zip(tokens, w[answer].tolist(), marked)]
    gains = [(t, max(v, 0) / cfg.cal_beta, m)
             for t, v, m in zip(tokens, delta[answer].tolist(), marked)]
    token_rows = [(weight_label, weights), (f'delta o: the {cfg.cal_gain} gain from the image',
                                            gains)]
    title = f'{METHOD} (--cal {str(cfg.cal).lower()}): test image 0'
    common.render_tokens(image, token_rows, str(path), title=title, mark_label='visual word')


@torch.no_grad()
def evaluate(model, cfg, split, run, world, png=None):
    """Greedy captions (bleu4 meteor rouge_l cider) and, on ShapesWorld, question answering
    (vqa_acc, per kind), each also blind (image tokens zeroed); delta_auroc: how well Δo on the
    first reference caption's tokens separates ShapesWorld's visual words from the others; and
    gain_study's metrics on val's noisy set (png: its histogram beside, as cal_gain.png)."""
    model.eval()
    device = run.device
    dataset = build_dataset(cfg, split, world, max_images=cfg.eval_images)
    predictions, blind, references, deltas, visual = {}, {}, {}, [], []
    drop_unreadable = lambda items: [item for item in items if item is not None]
    for batch in eval_loader(dataset, cfg.batch_size, drop_unreadable):
        if not batch:  # every image of this batch unreadable (warned about)
            continue
        images = torch.stack([item['image'] for item in batch]).to(device)
        prompts = [cfg.caption_prompt] * len(batch)
        for item, caption, caption_blind in zip(batch, model.generate(images, prompts),
                                                model.generate(images, prompts, blind=True)):
            predictions[item['image_id']], blind[item['image_id']] = caption, caption_blind
            references[item['image_id']] = item['captions']
        # each image with its first caption, cleaned as in training (item['captions'] are raw)
        rows = collate_rows(batch, model.tokenizer, cfg, model.n_image)
        rows = common.to_device(rows, device)
        mask, start = rows['attention_mask'], rows['image_start']
        logits, x = model(rows['input_ids'], rows['image'], start, mask)
        targets = rows['labels'][:, 1:]
        delta = target_gain(model, x, mask, start, logits[:, :-1], targets)['logit']
        # the caption's tokens, not EOS
        words = (targets != -100) & (targets != model.tokenizer.eos_token_id)
        deltas.append(delta[words].cpu())
        visual.append(rows['visual_mask'][:, 1:][words].cpu())
    metrics = common.caption_metrics(predictions, references)
    metrics['blind_cider'] = common.caption_metrics(blind, references)['cider']
    if world is not None:  # ShapesWorld knows which words are visual, and the scenes
        metrics['delta_auroc'] = common.auroc(torch.cat(deltas), torch.cat(visual).long())
        metrics.update(question_accuracy(model, cfg, split, device, world))
        gains, gain_metrics = gain_study(model, cfg, world, device)
        metrics.update(gain_metrics)
        if png:
            draw_gain_histogram(gains['logit'], cfg, Path(png).with_name(f'{METHOD}_gain.png'))
    if png:
        item = dataset[0]
        draw(model, cfg, item['image'], item['caption'], device, png)
    model.train()
    return metrics


@torch.no_grad()
def predict(model, cfg, run):
    """--predict: the greedy answer to --question (default: the caption prompt) for each image file,
    one block per file."""
    model.eval()
    question = cfg.question or cfg.caption_prompt
    for path in cfg.predict:
        image = read_image(path, cfg.image_size)                                 # (3, H, W)
        answer = model.generate(image[None].to(run.device), [question])[0]
        print(f"{path}\n  {question} -> {answer}")


# ----------------------------------------------------------------------------- training loop

def training_rows(cfg, stage, world):
    """Stage 1: captions; stage 2: captions and (on ShapesWorld) questions, one to one, a share
    text_only_frac of the rows captions without their image."""
    captions = build_dataset(cfg, 'train', world)
    if stage == 1:
        return captions
    rows = Mixture(captions, QuestionRows(world, 'train')) if world is not None else captions
    return TextOnly(rows, captions, cfg.text_only_frac, cfg.seed) if cfg.text_only_frac else rows


def cal_overhead(model, batch, cfg, run, steps=5):
    """Time per training step (forward + backward) with CAL / without CAL - 1, on the same batch in
    this process (the paper: about +22% for LLaVA-NeXT on 16 A100s). The bare model (no DDP: rank 0
    alone runs this); the gradients are discarded: nothing is trained."""
    seconds = {}
    sync = torch.cuda.synchronize if run.device.type == 'cuda' else lambda: None
    for use_cal in (False, True, False, True):  # twice each, the first round warms up
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            with run.autocast():
                loss = answer_loss(model, model, batch, cfg, use_cal)['loss']
            loss.backward()
        sync()
        seconds[use_cal] = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds[True] / seconds[False] - 1


def main(argv=None):
    cfg = common.parse_config(Config, PRESETS, argv, stem=METHOD)
    check_config(cfg)
    cfg, release = backbones.llava_release(cfg)
    released = release is not None and cfg.init_from == cfg.lm_backbone  # no ckpt.pt to load
    run = common.setup(cfg, supports_fsdp=True)  # --fsdp: a 7B LLM shards over 8 GPUs
    out = Path(cfg.out_dir)
    world = None
    if cfg.data == 'shapes':
        world = ShapesWorld(seed=0, image_size=cfg.image_size, caption_noise=cfg.caption_noise)
    if not cfg.predict:
        build_dataset(cfg, 'test', world, max_images=1)  # fail early on a bad path or file
    parts = (backbones.llava_from_hf(cfg.lm_backbone, release, run.dtype) if release else
             dict(vision=backbones.load_backbone(cfg.vision_backbone, 'vision', dtype=run.dtype),
                  llm=backbones.load_backbone(cfg.lm_backbone, 'lm'),
                  tokenizer=backbones.load_tokenizer(cfg.lm_backbone)))
    # Llama-style tokenizers have none: pads are masked, any id will do
    if parts['tokenizer'].pad_token_id is None:
        parts['tokenizer'].pad_token = parts['tokenizer'].eos_token
    model = VLM(cfg, **parts).to(run.device)
    if cfg.grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    # --predict's config came with its checkpoint (common.parse_config); a release: as loaded
    if cfg.predict or cfg.eval_only:
        if not released:
            common.load_into(cfg.init_from or out / 'ckpt.pt', METHOD, model, flags=SHAPE_FLAGS)
        if run.is_main and cfg.predict:
            predict(model, cfg, run)
        elif run.is_main:
            metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
            print(common.write_metrics(cfg, metrics))
        return
    state, start = None, 0
    if cfg.resume:
        state = common.load_into(out / 'ckpt.pt', METHOD, model, flags=SHAPE_FLAGS)
        start = state['step']
    elif cfg.init_from and not released:  # weights only (e.g. --stage 2 from a stage-1 run)
        common.load_into(cfg.init_from, METHOD, model, flags=SHAPE_FLAGS)
    common.seed_rank(cfg, run)
    stages = common.stage_ranges(cfg)
    logger = common.Logger(replace(cfg, max_steps=stages[-1][2]), run, start)
    collate_fn = partial(collate_rows, tokenizer=model.tokenizer, cfg=cfg, n_image=model.n_image)
    trainable, batch = None, None
    for stage, first, last in stages:
        if last <= max(first, start):
            continue
        trainable = None  # stage 1's DDP wrapper goes before stage 2's is built
        module = model.projector if stage == 1 else nn.ModuleList([model.projector, model.llm])
        model.llm.requires_grad_(stage == 2)  # stage 1: the LLM is frozen
        use_cal = cfg.cal and str(stage) in cfg.cal_stages.split(',')
        schedule = common.stage_schedule(cfg, stage, first, last)
        # DDP syncs what requires grad when built: the projector in stage 1, + the LLM in stage 2;
        # FSDP shards the model (once, in place) before the optimizer takes its parameters
        trainable = common.wrap_ddp(torch.compile(model) if cfg.compile else model, run)
        optimizer = torch.optim.AdamW(common.param_groups(module, cfg.weight_decay), lr=schedule.lr)
        common.resume_stage(state, stage, first, start, model, optimizer, out / 'ckpt.pt',
                            SHAPE_FLAGS)
        model.train()
        rows = training_rows(cfg, stage, world)
        batch_stream = partial(train_batches, rows, cfg.batch_size, collate_fn, cfg.seed + stage,
                               num_workers=cfg.num_workers, rank=run.rank,
                               world_size=run.world_size, max_bad_images=cfg.max_bad_images)
        batches = batch_stream(start_step=(max(first, start) - first) * cfg.grad_accum)
        # for MFU, on another copy of the data
        fresh_batch = lambda: common.to_device(next(batch_stream()), run.device)
        one_step = lambda: answer_loss(model, model, fresh_batch(), cfg, use_cal)['loss']
        with logger.paused():  # one step's FLOPs, for mfu (CUDA only)
            logger.flops_per_sample = common.count_flops(one_step, model, cfg.batch_size, run)
        for step in range(max(first, start), last):
            lr = common.lr_at(step - first, schedule)
            common.set_lr(optimizer, lr)
            for micro in range(cfg.grad_accum):
                if run.distributed and not run.fsdp:  # DDP syncs the last micro-batch's only
                    trainable.require_backward_grad_sync = micro == cfg.grad_accum - 1
                batch = common.to_device(next(batches), run.device)
                with run.autocast():
                    losses = answer_loss(model, trainable, batch, cfg, use_cal)
                common.check_finite(losses['loss'], step, cfg)
                (losses['loss'] / cfg.grad_accum).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logger.step(step, {k: v.item() for k, v in losses.items()}, lr)
            evaluating = cfg.eval_every and (step + 1 - first) % cfg.eval_every == 0
            if evaluating and step + 1 < last:  # rank 0 evaluates (under FSDP the whole model)
                with logger.paused(), common.unsharded(model):
                    if run.is_main:
                        val = evaluate(model, cfg, 'val', run, world)
                        logger.log(dict(step=step + 1, **{f'val_{k}': v for k, v in val.items()}))
            if evaluating or step + 1 == last:
                with logger.paused():  # every rank: under FSDP each sends its shards to rank 0
                    common.save_checkpoint(out / 'ckpt.pt', METHOD, model, optimizer, step + 1, cfg,
                                           stage=stage)
    with common.unsharded(model):  # FSDP: every rank gathers the weights, rank 0 evaluates
        if run.is_main:
            metrics = evaluate(model, cfg, 'test', run, world, png=out / f'{METHOD}.png')
            if cfg.stage != '1' and batch is not None and not run.fsdp:  # rank 0's step alone
                metrics['cal_overhead'] = cal_overhead(model, batch, cfg, run)
            print(common.write_metrics(cfg, {**metrics, **logger.speed()}))
    logger.close()
    trainable = None  # DDP's reducer goes before the process group
    common.teardown(run)


if __name__ == '__main__':
    common.main_guard(main)
