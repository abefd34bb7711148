"""
backbones.py — the built-in `shapes-tiny-*` backbones: tiny unimodal models that common.py trains on ShapesWorld on
first use and saves with save_pretrained, so that every method loads them through the same from_pretrained path
as a real Hugging Face checkpoint, offline. None of them sees an image-text pair.

    python backbones.py            # build (or find) the three and print their unimodal quality
"""
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import RunConfig, lr_at, set_lr
from data import COLORS, SHAPES, SIZES, ShapesWorld, UserError, build_tokenizer

BACKBONE_DIR = Path(os.environ.get('NANOALIGN_BACKBONES', 'out/backbones'))


def builtin_backbone(name, cache_dir=None, steps=None):
    """Folder of a built-in backbone, training it first if it is not there yet. Under torchrun rank 0
    trains while the others wait. `steps` overrides the training length (tests use a few)."""
    if name not in BUILTIN_BACKBONES:
        raise UserError(f"unknown built-in backbone '{name}'; the built-ins are {', '.join(BUILTIN_BACKBONES)}")
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
    """ViT trained on two tasks: name the colour, shape and size in each 3x3 cell (class 0 = empty) from the
    mean of the patch tokens inside the cell, so patch tokens learn what is where; and say which colours,
    shapes, sizes and cells occur from the [CLS] token, so [CLS] summarises the scene the way a
    classification-pretrained ViT's [CLS] does."""
    from transformers import ViTConfig, ViTModel
    world = ShapesWorld(seed=0)
    model = ViTModel(ViTConfig(image_size=world.image_size, patch_size=8, hidden_size=128, num_hidden_layers=4,
                               num_attention_heads=4, intermediate_size=512, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0))  # with HF's (unused) pooler, as checkpoints have
    n_classes = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
    cell_head, presence_head = nn.Linear(128, sum(n_classes)), nn.Linear(128, _presence_targets([]).shape[1])
    grid = world.image_size // 8
    cell_of_patch = (torch.arange(grid) * 3 // grid)                          # (grid,) patch row/col -> cell row/col
    cell_index = (cell_of_patch[:, None] * 3 + cell_of_patch[None, :]).flatten()  # (N,) patch -> cell 0..8
    pool = F.one_hot(cell_index, 9).T.float()
    pool = pool / pool.sum(1, keepdim=True)                                   # (9, N) mean over a cell's patches

    def predict(images):  # -> (colour, shape, size) logits (B, 9, classes) each, presence logits (B, 23)
        tokens = model(images).last_hidden_state                              # (B, 1+N, D)
        return cell_head(pool @ tokens[:, 1:]).split(n_classes, dim=-1), presence_head(tokens[:, 0])

    def batch_fn(step):
        images, scenes = _shapes_images(world, 'train', range(step * batch_size, (step + 1) * batch_size))
        cells, presence = predict(images)
        targets = _cell_targets(scenes)
        return (sum(F.cross_entropy(lg.flatten(0, 1), targets[..., a].flatten()) for a, lg in enumerate(cells))
                + F.binary_cross_entropy_with_logits(presence, _presence_targets(scenes)))

    _train_loop(model, [*model.parameters(), *cell_head.parameters(), *presence_head.parameters()], steps, desc,
                batch_fn)
    correct = total = presence_correct = presence_total = 0
    with torch.no_grad():  # on 512 val images: attribute accuracy on occupied cells, presence accuracy
        for start in range(0, 512, 128):
            images, scenes = _shapes_images(world, 'val', range(start, start + 128))
            cells, presence = predict(images)
            targets, present = _cell_targets(scenes), _presence_targets(scenes)
            occupied = targets[..., 0] > 0
            correct += sum((lg.argmax(-1) == targets[..., a])[occupied].sum().item() for a, lg in enumerate(cells))
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
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling
    world, tokenizer = ShapesWorld(seed=0), build_tokenizer()
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, intermediate_size=512, max_position_embeddings=64,
                                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       pad_token_id=tokenizer.pad_token_id))
    masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)

    def masked(split, indices):
        enc = _caption_batch(world, tokenizer, split, indices)
        return masker([dict(input_ids=ids, attention_mask=m) for ids, m in zip(enc.input_ids, enc.attention_mask)])

    def batch_fn(step):
        return model(**masked('train', range(step * batch_size, (step + 1) * batch_size))).loss

    _train_loop(model, list(model.parameters()), steps, desc, batch_fn)
    torch.manual_seed(0)
    correct = total = 0
    with torch.no_grad():  # masked-token accuracy on 1000 val captions
        for start in range(0, 1000, 250):
            batch = masked('val', range(start, start + 250))
            predicted = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits.argmax(-1)
            labelled = batch['labels'] != -100
            correct += (predicted == batch['labels'])[labelled].sum().item()
            total += labelled.sum().item()
    return model, tokenizer, dict(val_mlm_acc=round(100 * correct / total, 2))


def _pretrain_lm(steps, desc, batch_size=128):
    """A tiny Qwen2 causal LM, next-token prediction on ShapesWorld captions (text only)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    world, tokenizer = ShapesWorld(seed=0), build_tokenizer()
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, tie_word_embeddings=True,
                                         bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                                         pad_token_id=tokenizer.pad_token_id))

    def nll(split, indices):  # mean next-token NLL of "[CLS] caption [SEP]", pads ignored
        enc = _caption_batch(world, tokenizer, split, indices)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        return model(**enc, labels=labels).loss

    _train_loop(model, list(model.parameters()), steps, desc,
                lambda step: nll('train', range(step * batch_size, (step + 1) * batch_size)))
    with torch.no_grad():  # perplexity on 1000 val captions
        val_nll = sum(nll('val', range(s, s + 250)).item() for s in range(0, 1000, 250)) / 4
    return model, tokenizer, dict(val_perplexity=round(math.exp(val_nll), 3))


BUILTIN_BACKBONES = {  # name -> (pretraining function, default steps: one to three minutes each on 2 CPU cores)
    'shapes-tiny-vision': (_pretrain_vision, 1000),
    'shapes-tiny-text': (_pretrain_text, 400),
    'shapes-tiny-lm': (_pretrain_lm, 400),
}


if __name__ == '__main__':
    for backbone in BUILTIN_BACKBONES:
        print(backbone, (Path(builtin_backbone(backbone)) / 'quality.json').read_text())
