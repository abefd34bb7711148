"""Data for nanoalign: ShapesWorld (the built-in, offline data set), caption JSON (COCO / Flickr30k
Karpathy, any image-caption rows), transforms, collate, loaders. Imports nothing from the project.

ShapesWorld in one minute:
    world = ShapesWorld(seed=0)
    world.scene('train', 7)     # [dict(color='red', shape='circle', size='small', row=0, col=2)]
    world.image('train', 7)     # 64x64 RGB PIL image
    world.captions('train', 7)  # 5 true captions: 'a small red circle above a large blue square'
    world.swap(caption, scene, 'color', rng)  # one visual word changed, caption now false

All is a pure function of (seed, split, index) via world.rng, whatever the call order or workers."""
import hashlib
import json
import os
import re
import urllib.request
import warnings
import zlib
from functools import cache, cached_property, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T
from tqdm import tqdm


class UserError(Exception):
    """A mistake in the user's input (flag, file, data); method files print only its message."""


# ----------------------------------------------------------------------------- vocabulary

COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'gray')
SHAPES = ('circle', 'square', 'triangle', 'cross')
PLURALS = ('circles', 'squares', 'triangles', 'crosses')  # only in count questions
SIZES = ('small', 'large')
POSITION_WORDS = ('top', 'bottom', 'left', 'right', 'center')  # 'at the top left', 'at the center'
RELATION_WORDS = ('above', 'below', 'left', 'right')           # 'above', 'to the left of'
ATTRIBUTE_WORDS = dict(color=COLORS, shape=SHAPES, size=SIZES,
                       position=('top', 'bottom', 'left', 'right', 'center', 'above', 'below'))
# Grounding labels: a word is visual when the image decides whether it is right.
VISUAL_WORDS = frozenset(COLORS + SHAPES + PLURALS + SIZES + POSITION_WORDS + RELATION_WORDS)
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAPTIONS_PER_IMAGE = 5
SPLITS = ('train', 'val', 'test')
EVAL_IMAGES = 1000  # val and test size
# Split ranges in the one global image stream: test [0, 1000), val [1000, 2000), train [2000, ...).
SPLIT_START = dict(test=0, val=EVAL_IMAGES, train=2 * EVAL_IMAGES)
# Scenes are also disjoint in *content*: a scene (objects and cells) belongs to one split by a hash
# bucket, so no val/test scene is ever seen in training.
SPLIT_BUCKETS = dict(test=(0,), val=(1,), train=tuple(range(2, 20)))

RGB = dict(red=(220, 40, 40), green=(40, 180, 60), blue=(50, 90, 230), yellow=(230, 210, 40),
           purple=(150, 60, 200), orange=(245, 140, 30), white=(245,) * 3, gray=(128,) * 3)
STREAMS = dict(scene=0, pixels=1, captions=2, noise=3, questions=4, answer_noise=5)  # per image


# ----------------------------------------------------------------------------- caption grammar
# caption := 'there is' NP POS | POS 'there is' NP | NP 'is' POS | NP | NP ('and' | ['is'] REL) NP
# NP      := 'a' [size] [color] shape  ('a' even before a vowel: a swap must change one word only)
# POS     := 'at the' (top|bottom)? (left|right)? , or 'at the center'   (exactly one 3x3 cell)
# REL     := 'above' | 'below' | 'to the left of' | 'to the right of'  (rows / columns, strictly)
# Semantics are existential: "a red circle above a square" is true when SOME red circle is above
# SOME other object that is a square; a missing attribute matches anything.


def position_phrase(row, col):
    """Cell -> words: (0, 0) 'top left', (0, 1) 'top', (1, 1) 'center', (2, 2) 'bottom right'."""
    words = [w for w in (('top', None, 'bottom')[row], ('left', None, 'right')[col]) if w]
    return ' '.join(words) or 'center'


CELLS = {position_phrase(r, c): (r, c) for r in range(3) for c in range(3)}
RELATIONS = {'and': lambda a, b: True,  # (object a, object b) -> does 'a REL b' hold
             'above': lambda a, b: a['row'] < b['row'], 'below': lambda a, b: a['row'] > b['row'],
             'to the left of': lambda a, b: a['col'] < b['col'],
             'to the right of': lambda a, b: a['col'] > b['col']}


def _np_regex(k):  # NP number k as named groups size{k} color{k} shape{k}
    return (f"a (?:(?P<size{k}>{'|'.join(SIZES)}) )?(?:(?P<color{k}>{'|'.join(COLORS)}) )?"
            f"(?P<shape{k}>{'|'.join(SHAPES)})")


_POS = f"at the (?P<pos>{'|'.join(CELLS)})"
_FORMS = [re.compile(form) for form in (
    f"there is {_np_regex(1)} {_POS}", f"{_POS} there is {_np_regex(1)}",
    f"{_np_regex(1)} is {_POS}", _np_regex(1), f"{_np_regex(1)} (?P<rel>and) {_np_regex(2)}",
    f"{_np_regex(1)} (?:is )?(?P<rel>above|below|to the left of|to the right of) {_np_regex(2)}")]


def parse_caption(caption):
    """Caption -> dict(nps=[np] or [np, np], cell=(row, col) | None, relation=RELATIONS key | None),
    each np a dict(size, color, shape) with None for a missing word; None if not in the grammar."""
    match = next((m for form in _FORMS if (m := form.fullmatch(caption))), None)
    if match is None:
        return None
    g = match.groupdict()
    nps = [{a: g[a + k] for a in ('size', 'color', 'shape')} for k in '12' if g.get('shape' + k)]
    return dict(nps=nps, cell=CELLS.get(g.get('pos')), relation=g.get('rel'))


def matches(obj, np_, cell=None):
    return (all(np_[k] is None or np_[k] == obj[k] for k in ('size', 'color', 'shape'))
            and (cell is None or cell == (obj['row'], obj['col'])))


def _holds(form, scene):  # a parsed caption on a scene
    if len(form['nps']) == 1:
        return any(matches(o, form['nps'][0], form['cell']) for o in scene)
    (np_a, np_b), related = form['nps'], RELATIONS[form['relation']]
    return any(a is not b and matches(a, np_a) and matches(b, np_b) and related(a, b)
               for a in scene for b in scene)


def caption_is_true(caption, scene):
    """Evaluate a grammar caption on a scene (existential; two NPs name two different objects)."""
    form = parse_caption(caption)
    if form is None:
        raise ValueError(f"not a ShapesWorld caption: '{caption}'")
    return _holds(form, scene)


def true_pairs(captions, scenes):
    """(len(scenes), len(captions)) bool tensor: [i, j] = caption j is true of scene i. In a batch,
    a caption of another image that is true of this one is no negative for it (ShapesWorld's small
    vocabulary makes that common); each caption is parsed once."""
    forms = [parse_caption(c) for c in captions]
    return torch.tensor([[f is not None and _holds(f, scene) for f in forms] for scene in scenes])


def swap(caption, scene, attribute, rng, absent=False):
    """Hard negative: change exactly one `attribute` word (color, shape, size or position, relation
    words included) so the caption is false of the scene -> (new_caption, word_index) or None.
    absent: the new word must name what no object has (a colour, shape or size; a cell no object
    is in; so never a relation word): a word the image contradicts, not one it shows elsewhere."""
    words, options = caption.split(), ATTRIBUTE_WORDS[attribute]
    cells = {(o['row'], o['col']) for o in scene} | {(parse_caption(caption) or {}).get('cell')}
    taken = cells if attribute == 'position' else {o[attribute] for o in scene}
    for i in rng.permutation([i for i, w in enumerate(words) if w in options]):
        for new in rng.permutation(options):
            swapped = ' '.join(words[:i] + [str(new)] + words[i + 1:])
            form = parse_caption(swapped) if new != words[i] else None
            value = form and (form['cell'] if attribute == 'position' else str(new))
            if form and not _holds(form, scene) and not (absent and value in taken):
                return swapped, int(i)
    return None


def np_words(obj, rng):
    """'[size] [color] shape', paraphrased: all 40%, colour+shape 40%, size+shape 10%, shape 10%."""
    keep_size, keep_color = ((1, 1), (0, 1), (1, 0), (0, 0))[rng.choice(4, p=(0.4, 0.4, 0.1, 0.1))]
    return ' '.join([obj['size']] * keep_size + [obj['color']] * keep_color + [obj['shape']])


def _one_caption(scene, rng):
    a = scene[rng.integers(len(scene))]
    templates = ['desc', 'there', 'front', 'is_at'] + ['rel', 'is_rel', 'and'] * (len(scene) > 1)
    template, pos = templates[rng.integers(len(templates))], position_phrase(a['row'], a['col'])
    if template == 'desc':
        return f"a {np_words(a, rng)}"
    if template == 'there':
        return f"there is a {np_words(a, rng)} at the {pos}"
    if template == 'front':
        return f"at the {pos} there is a {np_words(a, rng)}"
    if template == 'is_at':
        return f"a {np_words(a, rng)} is at the {pos}"
    b = [o for o in scene if o is not a][rng.integers(len(scene) - 1)]
    if template == 'and':
        return f"a {np_words(a, rng)} and a {np_words(b, rng)}"
    true_relations = [r for r in list(RELATIONS)[1:] if RELATIONS[r](a, b)]  # >= 1: cells differ
    relation = true_relations[rng.integers(len(true_relations))]
    verb = 'is ' if template == 'is_rel' else ''
    return f"a {np_words(a, rng)} {verb}{relation} a {np_words(b, rng)}"


# ----------------------------------------------------------------------------- ShapesWorld

class ShapesWorld:
    """Procedural scenes: 1-3 objects (colour, shape, size) in distinct cells of a 3x3 grid on a
    noisy dark canvas, with 5 true captions, hard negatives and optional caption noise."""

    def __init__(self, seed=0, image_size=64, min_objects=1, max_objects=3, caption_noise=0.0,
                 train_images=100_000):
        if not 1 <= min_objects <= max_objects <= 9:
            raise UserError(f"need 1 <= min_objects <= max_objects <= 9 (one object per cell of "
                            f"the 3x3 grid), got {min_objects} and {max_objects}")
        if not 0.0 <= caption_noise <= 1.0:
            raise UserError(f"--caption_noise must be a fraction in [0, 1], got {caption_noise}")
        if image_size < 24:
            raise UserError(f"--image_size {image_size} is too small for a 3x3 grid; use >= 24")
        self.seed, self.image_size, self.caption_noise = seed, image_size, caption_noise
        self.min_objects, self.max_objects = min_objects, max_objects
        self.sizes = dict(train=train_images, val=EVAL_IMAGES, test=EVAL_IMAGES)
        self.transform = T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])  # unaugmented

    def num_images(self, split):
        return self.sizes[split]

    def rng(self, split, index, stream):  # image index's own generator for one of STREAMS
        if not 0 <= index < (n := self.sizes[split]):
            raise IndexError(f"ShapesWorld {split} has {n} images, asked for index {index}")
        return np.random.default_rng([self.seed, SPLIT_START[split] + index, STREAMS[stream]])

    def scene(self, split, index):
        """-> list of dict(color, shape, size, row, col), one object per cell, drawn until its hash
        bucket belongs to `split` (~1.1 draws for train, 20 for val/test; microseconds each)."""
        rng = self.rng(split, index, 'scene')
        while True:
            n = int(rng.integers(self.min_objects, self.max_objects + 1))
            scene = [dict(color=COLORS[rng.integers(len(COLORS))],
                          shape=SHAPES[rng.integers(len(SHAPES))],
                          size=SIZES[rng.integers(len(SIZES))], row=int(c) // 3, col=int(c) % 3)
                     for c in sorted(rng.choice(9, n, replace=False))]
            if zlib.crc32(repr(scene).encode()) % 20 in SPLIT_BUCKETS[split]:
                return scene

    def image(self, split, index):
        """-> RGB PIL image (image_size x image_size): dark canvas with per-pixel noise; objects are
        jittered in position, size and colour: no two renderings of an attribute are identical."""
        s, cell = self.image_size, self.image_size / 3
        rng = self.rng(split, index, 'pixels')
        img = Image.fromarray(rng.integers(20, 60, (s, s, 3), dtype=np.uint8))  # background noise
        draw = ImageDraw.Draw(img)
        for obj in self.scene(split, index):
            cx, cy = (np.array([obj['col'], obj['row']]) + 0.5 + rng.uniform(-0.08, 0.08, 2)) * cell
            r = cell * (0.42 if obj['size'] == 'large' else 0.22) * rng.uniform(0.9, 1.1)
            color = tuple(np.clip(rng.integers(-12, 13, 3) + RGB[obj['color']], 0, 255).tolist())
            h, w, base = 0.85 * r, 0.3 * r, cy + 0.8 * r  # half square side, half bar width, base y
            if obj['shape'] == 'circle':
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
            elif obj['shape'] == 'square':
                draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
            elif obj['shape'] == 'triangle':
                draw.polygon([(cx, cy - r), (cx - r, base), (cx + r, base)], fill=color)
            else:  # cross: two bars
                draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
                draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        return img

    def captions(self, split, index):
        """-> 5 captions (distinct when the grammar allows), true unless noised (train only)."""
        return self.captions_and_noise(split, index)[0]

    def captions_and_noise(self, split, index):
        """-> (5 captions, 5 noise word indices): with caption_noise p, each *training* caption is,
        with probability p, made false by `swap` of one visual word to a value the scene lacks
        (with up to 3 objects a shape always is), whose word index is recorded (-1 = clean). The
        clean captions come from their own random stream: the same for every p."""
        scene, rng = self.scene(split, index), self.rng(split, index, 'captions')
        captions = []
        for _ in range(100):  # resample duplicates: identical texts make retrieval ties
            caption = _one_caption(scene, rng)
            if caption not in captions:
                captions.append(caption)
            if len(captions) == CAPTIONS_PER_IMAGE:
                break
        captions += [captions[-1]] * (CAPTIONS_PER_IMAGE - len(captions))
        noise = [-1] * CAPTIONS_PER_IMAGE
        if split == 'train' and self.caption_noise > 0:
            rng = self.rng(split, index, 'noise')
            noised = rng.random(CAPTIONS_PER_IMAGE) < self.caption_noise  # monotone in p
            for j in np.flatnonzero(noised):  # attributes in random order; clean if none can
                swaps = (swap(captions[j], scene, str(attribute), rng, absent=True)
                         for attribute in rng.permutation(list(ATTRIBUTE_WORDS)))
                captions[j], noise[j] = next((s for s in swaps if s), (captions[j], -1))
        return captions, noise

    def swap_pairs(self, split, n_images, seed=0):
        """The compositional test set (swap_acc): per image and attribute, the first caption `swap`
        can make false -> [(image index, true caption, swapped caption, attribute, word index)]."""
        pairs = []
        for i in range(n_images):
            rng, scene = np.random.default_rng([seed, i]), self.scene(split, i)
            for attribute in ATTRIBUTE_WORDS:
                swaps = ((c, swap(c, scene, attribute, rng)) for c in self.captions(split, i))
                caption, swapped = next(((c, s) for c, s in swaps if s), (None, None))
                if swapped:
                    pairs.append((i, caption, swapped[0], attribute, swapped[1]))
        return pairs

    # the grammar's helpers, reachable from a world too
    caption_is_true, swap = staticmethod(caption_is_true), staticmethod(swap)


def latents(images):
    """A fixed stand-in for a VAE encoder, so latent-input models run offline on ShapesWorld: (...,
    3, H, W) normalised images -> (..., 4, H/8, W/8), the 8x8 block means of R, G, B and the block
    standard deviation of the luminance (edges / texture), lossy like a VAE; no parameters."""
    *lead, _, h, w = images.shape
    if h % 8 or w % 8:
        raise UserError(f"latents need an image size divisible by 8, got {h}x{w}; "
                        f"change --image_size")
    x = images.reshape(-1, 3, h, w)                                      # (N, 3, H, W)
    luminance = x.mean(1, keepdim=True)                                  # (N, 1, H, W)
    spread = (F.avg_pool2d(luminance ** 2, 8) - F.avg_pool2d(luminance, 8) ** 2).clamp_min(0).sqrt()
    return torch.cat([F.avg_pool2d(x, 8), spread], 1).reshape(*lead, 4, h // 8, w // 8)


@cache  # once per tokenizer: get_vocab builds a dict of the whole vocabulary (152k ids for Qwen)
def visual_token_ids(tokenizer):  # the ids of VISUAL_WORDS in any vocabulary
    vocab = tokenizer.get_vocab()
    return torch.tensor([vocab[w] for w in VISUAL_WORDS if w in vocab])


# ----------------------------------------------------------------------------- caption JSON

KARPATHY_URL = 'https://storage.googleapis.com/sfr-vision-language-research/datasets/{}.json'
KARPATHY_FILES = dict(coco='coco_karpathy_{}', flickr30k='flickr30k_{}')  # names of BLIP's copies
LAYOUT = dict(coco="train2014/ and val2014/ (the COCO 2014 images)", flickr30k="flickr30k-images/")
_EXAMPLE_ROW = '{"image": "images/1.jpg", "caption": "a dog"}'  # for error messages


def pre_caption(caption, max_words=30):
    """Caption cleaning as in BLIP (ALBEF is the same up to which punctuation it drops): lowercase,
    punctuation to spaces, collapse spaces, keep the first max_words words."""
    caption = re.sub(r"([.!\"()*#:;~])", ' ', caption.lower())
    caption = re.sub(r"\s{2,}", ' ', caption).strip()
    return ' '.join(caption.split(' ')[:max_words])


def flip_caption(caption):
    """The words left and right swapped, so a caption stays true of a horizontally flipped image."""
    return re.sub(r"\b(left|right)\b", lambda m: 'right' if m[1] == 'left' else 'left', caption)


class ImageTransform:
    """(PIL image, caption) -> ((3, s, s) tensor, caption). Train: RandomResizedCrop(scale 0.5-1,
    bicubic) and a p=0.5 horizontal flip that also flips left/right words; eval: Resize((s, s))."""

    def __init__(self, image_size, train):
        self.train, bicubic = train, T.InterpolationMode.BICUBIC
        resize = (T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=bicubic) if train
                  else T.Resize((image_size, image_size), interpolation=bicubic))
        self.pixels = T.Compose([resize, T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])

    def __call__(self, image, caption):
        if self.train and torch.rand(()) < 0.5:
            image, caption = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flip_caption(caption)
        return self.pixels(image), caption


def load_latent(path):  # a precomputed VAE latent (4, h, w) from a .pt or .npy file
    return (torch.load(path, weights_only=True) if path.suffix == '.pt'
            else torch.from_numpy(np.load(path))).float()


def read_image(path, image_size, latents=False):
    """--predict's file -> (3, s, s) as in evaluation; with latents, its .pt / .npy tensor."""
    path, wanted = Path(path), 'a .pt / .npy latent' if latents else 'an image (JPEG, PNG, ...)'
    try:
        if latents:
            return load_latent(path)
        with Image.open(path) as image:
            return ImageTransform(image_size, train=False)(image.convert('RGB'), '')[0]
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e}); give {wanted}") from None


def read_captions(captions):
    """--captions: the texts given, or the non-empty lines of one .txt file."""
    if len(captions) == 1 and captions[0].endswith('.txt'):
        if not Path(captions[0]).is_file():
            raise UserError(f"--captions {captions[0]}: no such file (one caption per line)")
        captions = Path(captions[0]).read_text(encoding='utf-8').splitlines()
    return [c.strip() for c in captions if c.strip()]


def _read_rows(path):
    """JSON list (or JSON Lines) of dict rows; any problem is a UserError naming the file."""
    text, jsonl = Path(path).read_text(encoding='utf-8'), str(path).endswith('.jsonl')
    try:  # a .jsonl file holds one JSON row per line; anything else is one JSON list
        rows = ([json.loads(line) for line in text.splitlines() if line.strip()] if jsonl
                else json.loads(text))
    except json.JSONDecodeError as e:
        where = f"in the line {e.doc[:60]!r}" if jsonl else f"at line {e.lineno} column {e.colno}"
        raise UserError(f"{path} is not valid JSON ({e.msg} {where}); expected a JSON list of "
                        f"rows, or JSON Lines (.jsonl), each row like {_EXAMPLE_ROW}") from None
    if not isinstance(rows, list) or not rows:
        got = (f"a dict with keys {list(rows)[:5]}" if isinstance(rows, dict)
               else f"{type(rows).__name__} {rows!r:.40}")
        raise UserError(f"{path}: expected a non-empty JSON list of rows like {_EXAMPLE_ROW}, "
                        f"got {got}")
    for r, row in enumerate(rows):
        caption = row.get('caption') if isinstance(row, dict) else None
        good_caption = isinstance(caption, str) or (
            isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption))
        if not good_caption or not isinstance(row.get('image', row.get('latent')), str):
            raise UserError(f"{path}: row {r} is {row!r:.120}; each row needs 'caption' (a string "
                            f"or a list of strings) and 'image' (an image path) or 'latent' (a "
                            f".pt/.npy tensor path)")
    return rows


def hash_split(path, split_ratio):
    """An image's split by a stable hash of its path: its captions go together, on every run."""
    u = int(hashlib.md5(path.encode('utf-8')).hexdigest()[:8], 16) / 16 ** 8  # uniform in [0, 1)
    train, val, _ = (share / sum(split_ratio) for share in split_ratio)
    return 'train' if u < train else 'val' if u < train + val else 'test'


def latent_shape(path):  # from the file's header; None if unreadable (_load warns and skips it)
    try:
        return tuple(torch.load(path, mmap=True, weights_only=True).shape if path.suffix == '.pt'
                     else np.load(path, mmap_mode='r').shape)
    except (OSError, ValueError, RuntimeError):
        return None


class CaptionJSON(Dataset):
    """Image-caption JSON rows: the BLIP/ALBEF Karpathy files (train: a row per caption {image,
    caption, image_id}; val/test: a row per image {image, caption: [...]}) or any list of 'image' or
    'latent' paths relative to `root`, grouped by image (image_id = order of first appearance).
    Train items: one per caption; eval: one per image (ALBEF's texts/txt2img/img2txt). With
    split_ratio only the images hashed into `split` are kept. Eval `captions` are the raw ones."""

    def __init__(self, ann_file, root, split, image_size, max_words=30, max_images=0,
                 split_ratio=None):
        rows = _read_rows(ann_file)
        self.root, self.train = Path(root), split == 'train'
        self.transform = ImageTransform(image_size, train=self.train)
        image_index, self.paths, self.captions = {}, [], []  # [(kind, path)], [[caption]]
        self.references, self.split_images = [], {}  # [[raw caption]], {split: images}
        for r, row in enumerate(rows):
            kind = 'image' if 'image' in row else 'latent'
            key = (kind, row[kind])
            if split_ratio and key not in image_index:
                row_split = hash_split(row[kind], split_ratio)
                self.split_images.setdefault(row_split, set()).add(key)
                if row_split != split:
                    continue
            if key not in image_index:
                if max_images and len(self.paths) == max_images:
                    continue
                image_index[key] = len(self.paths)
                self.paths.append(key)
                self.captions.append([])
                self.references.append([])
            for caption in [row['caption']] if isinstance(row['caption'], str) else row['caption']:
                cleaned = pre_caption(caption, max_words)
                if not cleaned:
                    raise UserError(f"{ann_file}: row {r} has an empty caption ({caption!r}); "
                                    f"fix or remove that row")
                self.captions[image_index[key]].append(cleaned)
                self.references[image_index[key]].append(' '.join(caption.split()))
        self.split_images = {s: len(keys) for s, keys in self.split_images.items()}
        if not self.paths:
            counts = ', '.join(f"{self.split_images.get(s, 0)} {s}" for s in SPLITS)
            raise UserError(f"{ann_file} leaves no image for the {split} split ({counts} at "
                            f"--split_ratio {','.join(map(str, split_ratio))}); add images, change "
                            f"--split_ratio, or give one file per split ({{split}} in --ann_file)")
        if not (first := self.root / self.paths[0][1]).exists():
            raise UserError(f"{first} does not exist: the paths in {ann_file} are relative to "
                            f"--data_root ({root}); point --data_root at their folder")
        self.rows = [(i, c) for i, cs in enumerate(self.captions) for c in cs]  # train items
        self.texts = [c for cs in self.captions for c in cs]                    # eval: all captions
        self.txt2img = [i for i, cs in enumerate(self.captions) for _ in cs]    # and their images
        ends = np.cumsum([len(cs) for cs in self.captions]).tolist()
        self.img2txt = [list(range(end - len(cs), end)) for cs, end in zip(self.captions, ends)]

    def __len__(self):
        return len(self.rows) if self.train else len(self.paths)

    def _load(self, i, caption):  # -> (tensor, caption), None if unreadable (collate counts those)
        kind, path = self.paths[i][0], self.root / self.paths[i][1]
        try:
            if kind == 'latent':  # no augmentation
                return load_latent(path), caption
            with Image.open(path) as img:
                return self.transform(img.convert('RGB'), caption)
        except (OSError, ValueError, RuntimeError) as e:
            warnings.warn(f"skipping unreadable {kind} {path}: {type(e).__name__}: {e}")
            return None

    def __getitem__(self, k):
        i, caption = self.rows[k] if self.train else (k, self.captions[k][0])
        if (loaded := self._load(i, caption)) is None:
            return None
        item = dict(image=loaded[0], caption=loaded[1], image_id=i)
        return item if self.train else dict(item, captions=self.references[k])

    @cached_property
    def image_shapes(self):  # per image: its latent's shape (memory-mapped, not loaded), or None
        return [latent_shape(self.root / path) if kind == 'latent' else None  # pixels: one shape
                for kind, path in self.paths]

    def item_shapes(self):  # per item (train: caption row, eval: image), for the loaders' buckets
        return [self.image_shapes[i] for i, _ in self.rows] if self.train else self.image_shapes


def _fetch(url, path):
    """Download url to path with a progress bar; -> None on success, else the reason it failed."""
    if os.environ.get('NANOALIGN_OFFLINE') == '1':
        return 'NANOALIGN_OFFLINE=1'
    tmp = Path(f"{path}.part")
    try:
        with urllib.request.urlopen(url, timeout=10) as response, open(tmp, 'wb') as out, \
                tqdm(total=int(response.headers.get('Content-Length', 0)) or None, unit='B',
                     unit_scale=True, desc=f"downloading {Path(path).name}") as bar:
            while chunk := response.read(1 << 16):
                bar.update(out.write(chunk))
    except OSError as e:  # URLError, timeouts and unwritable folders are all OSErrors
        tmp.unlink(missing_ok=True)
        return f"{type(e).__name__}: {e}"
    os.replace(tmp, path)


class ShapesCaptions(Dataset):
    """ShapesWorld in CaptionJSON's row format. Train items: one per caption, with the split `index`
    (for world.scene) and `noise_word` (-1 or the noised word's index). Eval items: one per image
    with all 5 captions. image_input='latents' gives stand-in latents (4, H/8, W/8) as `image`."""

    def __init__(self, world, split, image_input='pixels', max_images=0):
        self.world, self.split, self.train = world, split, split == 'train'
        self.image_input = image_input
        self.n_images = min(world.num_images(split), max_images or world.num_images(split))
        if not self.train:  # ALBEF's retrieval lists: all captions, and which image each belongs to
            self.texts = [c for i in range(self.n_images) for c in world.captions(split, i)]
            self.txt2img = [i for i in range(self.n_images) for _ in range(CAPTIONS_PER_IMAGE)]
            self.img2txt = [list(range(i * CAPTIONS_PER_IMAGE, (i + 1) * CAPTIONS_PER_IMAGE))
                            for i in range(self.n_images)]

    def __len__(self):
        return self.n_images * CAPTIONS_PER_IMAGE if self.train else self.n_images

    def __getitem__(self, k):
        index, j = divmod(k, CAPTIONS_PER_IMAGE) if self.train else (k, 0)
        if not 0 <= index < self.n_images:
            raise IndexError(k)
        image = self.world.transform(self.world.image(self.split, index))  # (3, H, W)
        captions, noise = self.world.captions_and_noise(self.split, index)
        if self.image_input == 'latents':
            image = latents(image)  # (4, H/8, W/8)
        item = dict(image=image, caption=captions[j], image_id=index, index=index,
                    noise_word=noise[j])
        return item if self.train else dict(item, captions=captions)


def build_dataset(cfg, split, world=None, image_input='pixels', max_images=0):
    """The split's dataset for a config's data, data_root, ann_file, image_size and split_ratio.
    cfg.data: 'shapes' (needs `world`) | 'coco' | 'flickr30k' (Karpathy JSONs in data_root, fetched
    if missing) | 'json' (`ann_file`, paths relative to data_root, else to the file's folder; a
    '{split}' in ann_file becomes the split name, otherwise the one file is split by image path
    into train / val / test at split_ratio, so no evaluation sees a training image)."""
    data, data_root, ann_file, split_ratio = cfg.data, cfg.data_root, cfg.ann_file, cfg.split_ratio
    if data == 'shapes':
        return ShapesCaptions(world, split, image_input=image_input, max_images=max_images)
    if data not in ('coco', 'flickr30k', 'json'):
        raise UserError(f"unknown --data '{data}'; choose shapes, coco, flickr30k or json")
    if data == 'json':
        if not ann_file:
            raise UserError("--data json needs --ann_file (a JSON list or JSONL of "
                            "{image|latent, caption} rows)")
        path = Path(ann_file.replace('{split}', split))
        if not path.is_file():
            raise UserError(f"--ann_file {path} does not exist")
        root = Path(data_root) if data_root else path.parent
        if '{split}' in ann_file:
            split_ratio = None
        elif len(split_ratio) != 3 or min(split_ratio) < 0 or sum(split_ratio) <= 0:
            raise UserError(f"--split_ratio {','.join(map(str, split_ratio))} must be three "
                            f"shares train,val,test (e.g. 0.9,0.05,0.05)")
    else:
        root = Path(data_root)
        if not data_root or not root.is_dir():
            raise UserError(f"--data_root '{data_root}' is not a folder; for --data {data} it must "
                            f"hold {LAYOUT[data]} and the annotation JSONs")
        name = KARPATHY_FILES[data].format(split)
        path, url = root / f"{name}.json", KARPATHY_URL.format(name)
        if not path.is_file() and (failed := _fetch(url, path)):
            raise UserError(f"annotation file {path} is missing and could not be downloaded "
                            f"({failed}); download {url} and put it at {path}")
    dataset = CaptionJSON(path, root, split, cfg.image_size, max_images=max_images,
                          split_ratio=split_ratio if data == 'json' else None)
    if dataset.split_images and split == 'train' and int(os.environ.get('RANK', 0)) == 0:
        counts = ' / '.join(str(dataset.split_images.get(s, 0)) for s in SPLITS)
        print(f"{path} split by image path at {','.join(map(str, split_ratio))}: {counts} images "
              f"in train / val / test")
    if (image_input == 'latents') != (dataset.paths[0][0] == 'latent'):
        raise UserError(f"--image_input {image_input} needs rows with "
                        f"'{'latent' if image_input == 'latents' else 'image'}' paths, but {path} "
                        f"has '{dataset.paths[0][0]}' rows")
    return dataset


# ----------------------------------------------------------------------------- collate and loaders

def collate(batch, tokenizer, max_len):
    """Items -> dict(image (B, 3, H, W) [or (B, 4, h, w) latents], input_ids, attention_mask (B, L),
    image_id (B,), caption (B strings), n_bad); ShapesWorld adds index (B,), visual_mask and
    noise_mask (B, L) (1 on the noised word's tokens); eval items add captions (B lists). Unreadable
    items (None) are dropped and counted in n_bad; a batch with none readable is dict(n_bad=B)."""
    items = [item for item in batch if item is not None]
    if not items:
        return dict(n_bad=len(batch))
    shapes = {tuple(item['image'].shape) for item in items}
    if len(shapes) > 1:  # e.g. latent files of different grids: one batch needs one shape
        raise UserError(f"one batch holds images / latents of different shapes {sorted(shapes)}; "
                        f"store every latent with the same (channels, h, w), or resize the images "
                        f"to one size")
    enc = tokenizer([item['caption'] for item in items], padding='longest', truncation=True,
                    max_length=max_len, return_tensors='pt')
    out = dict(image=torch.stack([item['image'] for item in items]), input_ids=enc.input_ids,
               attention_mask=enc.attention_mask,
               image_id=torch.tensor([item['image_id'] for item in items]),
               caption=[item['caption'] for item in items], n_bad=len(batch) - len(items))
    if 'captions' in items[0]:
        out['captions'] = [item['captions'] for item in items]
    if 'noise_word' in items[0]:
        out['index'] = torch.tensor([item['index'] for item in items])
        out['visual_mask'] = torch.isin(enc.input_ids, visual_token_ids(tokenizer)).long()
        out['noise_mask'] = torch.zeros_like(enc.input_ids)
        for b, item in enumerate(items):  # word index -> token positions (a word may span tokens)
            for t, word in enumerate(enc.word_ids(b)):
                out['noise_mask'][b, t] = int(word is not None and word == item['noise_word'])
    return out


def shape_buckets(dataset):
    """{shape: [item index]} for items of several shapes (latent grids), else None; unreadable
    items join the first bucket."""
    shapes = dataset.item_shapes() if hasattr(dataset, 'item_shapes') else []
    buckets = {shape: [] for shape in shapes if shape is not None}
    if len(buckets) < 2:
        return None
    for k, shape in enumerate(shapes):
        buckets[shape or next(iter(buckets))].append(k)
    return buckets


def bucket_batches(buckets, batch_size, seed, epoch, rank, world_size):
    """This rank's batches of an epoch, each from one bucket: buckets shuffled (seed, epoch), cut
    into full batches, those shuffled, batch j to rank j % world_size, as many on every rank."""
    rng, batches = np.random.default_rng([seed, epoch]), []
    for items in buckets.values():
        items = [items[i] for i in rng.permutation(len(items))]
        batches += [items[s:s + batch_size] for s in range(0, len(items) - batch_size + 1,
                                                           batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches[rank:len(batches) // world_size * world_size:world_size]


def train_batches(dataset, batch_size, collate_fn, seed, start_step=0, num_workers=0, rank=0,
                  world_size=1, max_bad_images=0):
    """Infinite generator of training batches. Each epoch: DistributedSampler(shuffle, seed,
    drop_last=True) cut into full batches of this rank's share, or bucket_batches for several image
    shapes. start_step skips batches by index arithmetic (not loading them): a resumed run sees an
    unbroken run's batches. Unreadable images are skipped and counted, up to max_bad_images."""
    if buckets := shape_buckets(dataset):
        epoch_batches = partial(bucket_batches, buckets, batch_size, seed, rank=rank,
                                world_size=world_size)
        steps_per_epoch = len(epoch_batches(0))
    else:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=seed, drop_last=True)
        steps_per_epoch = len(sampler) // batch_size

        def epoch_batches(epoch):
            sampler.set_epoch(epoch)
            indices = list(sampler)
            return [indices[s * batch_size:(s + 1) * batch_size] for s in range(steps_per_epoch)]
    if steps_per_epoch == 0:
        shapes = f" in {len(buckets)} latent shapes (one per batch)" if buckets else ""
        raise UserError(f"the training set has {len(dataset)} rows{shapes}, fewer than one batch "
                        f"of {batch_size} per process x {world_size} processes; "
                        f"lower --batch_size")
    (epoch, skip), n_bad = divmod(start_step, steps_per_epoch), 0
    while True:
        batches = epoch_batches(epoch)[skip:]
        # own generator: creating the loader must not draw from the global RNG, or a resumed run's
        # masks and samples would be shifted by one draw against the uninterrupted run's
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                            num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                            generator=torch.Generator().manual_seed(seed + epoch))
        for batch in loader:
            n_bad += batch['n_bad']
            if n_bad > max_bad_images:
                raise UserError(f"{n_bad} images could not be read (see the warnings above for "
                                f"which), more than --max_bad_images {max_bad_images}; fix the "
                                f"files or raise --max_bad_images")
            if 'image' in batch:
                yield batch
        epoch, skip = epoch + 1, 0


def eval_loader(dataset, batch_size, collate_fn, num_workers=0):
    """Plain ordered loader over a val/test set (every image once, last batch partial); with
    several image shapes (shape_buckets), the items in order within each shape's own batches."""
    buckets = shape_buckets(dataset) or {None: list(range(len(dataset)))}
    batches = [items[s:s + batch_size] for items in buckets.values()
               for s in range(0, len(items), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())
