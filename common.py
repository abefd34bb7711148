"""
common.py — what every nanoalign method shares, and nothing that belongs to one method.

  config & CLI      RunConfig (the common fields), parse_config (presets + flags), main_guard
  run setup         device, torchrun DDP (NCCL / gloo), bf16 autocast, seeds, TF32
  training          lr schedule, AdamW param groups, checkpoints, logger, all_gather, speed / MFU
  modules           ViT (pre-LN) and BERT-style layers + explicit key maps from Hugging Face weights
  backbones         load_backbone: HF ids / paths, and the built-in shapes-tiny-{vision,text,lm} (backbones.py)
  metrics           retrieval recall, captioning (pycocoevalcap), AUROC, render_tokens
"""
import dataclasses
import difflib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as spice_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import CLIP_MEAN, CLIP_STD, UserError

# ----------------------------------------------------------------------------- config & CLI

@dataclass
class RunConfig:
    """The fields every method file has, under the same names. Methods subclass it."""
    data: str = 'shapes'        # shapes | coco | flickr30k | json (rows of --ann_file)
    data_root: str = ''         # folder holding the images (coco / flickr30k / json)
    ann_file: str = ''          # caption JSON / JSONL for --data json
    out_dir: str = ''           # default: out/<file stem>
    max_steps: int = 1000       # optimizer steps
    batch_size: int = 32        # per process (global batch = batch_size * world_size * grad_accum)
    grad_accum: int = 1         # micro-batches per optimizer step
    lr: float = 1e-4            # peak learning rate
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100     # linear warm-up, then cosine
    weight_decay: float = 0.02  # AdamW, not applied to biases / norms (1-D params)
    grad_clip: float = 1.0      # max grad norm (0 = off)
    grad_checkpointing: bool = False  # recompute activations of big backbones in backward
    eval_every: int = 0         # evaluate on val every N steps (0 = only the final test eval)
    eval_only: bool = False     # load out_dir/ckpt.pt (or --init_from) and write metrics.json
    init_from: str = ''         # checkpoint to evaluate / start from
    resume: bool = False        # continue from out_dir/ckpt.pt
    device: str = 'auto'        # auto | cpu | cuda
    dtype: str = 'auto'         # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False       # torch.compile the model
    num_workers: int = 0        # data loader workers
    max_bad_images: int = 0     # unreadable images to skip (counted) before stopping
    seed: int = 0
    log_every: int = 10         # steps between log.jsonl lines


def _parse_value(name, text, default):
    """Turn the text of --name into the type of the field's default."""
    if isinstance(default, bool):
        if text.lower() not in ('true', 'false'):
            raise UserError(f"--{name} takes true or false, got '{text}'")
        return text.lower() == 'true'
    if isinstance(default, tuple):
        return tuple(_parse_value(name, t, default[0]) for t in text.split(',')) if default else tuple(text.split(','))
    try:
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{name} takes a {type(default).__name__}, got '{text}'") from None


def parse_config(config_cls, presets, argv=None, stem=None):
    """Flags are the field names (`--max_steps 300` or `--max_steps=300`). `--data X` first applies
    presets[X] (a dict of overrides at the top of the method file), then explicit flags win."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {f.name for f in fields(config_cls)}
    flags = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            raise UserError(f"unexpected argument '{arg}': flags look like --name value")
        name, _, text = arg[2:].partition('=')
        if not _:
            if i + 1 >= len(argv):
                raise UserError(f"--{name} needs a value")
            text, i = argv[i + 1], i + 1
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=1)
            hint = f"; did you mean --{close[0]}?" if close else f"; valid flags: {', '.join(sorted(names))}"
            raise UserError(f"unknown flag --{name}{hint}")
        flags[name] = text
        i += 1
    defaults = config_cls()
    data = flags.get('data', defaults.data)
    if data not in presets:
        raise UserError(f"unknown --data '{data}'; choose one of: {', '.join(presets)}")
    values = {**presets[data]}
    values.update({k: _parse_value(k, v, getattr(defaults, k)) for k, v in flags.items()})
    cfg = dataclasses.replace(defaults, **values)
    if not cfg.out_dir:
        cfg.out_dir = str(Path('out') / (stem or Path(sys.argv[0]).stem))
    return cfg


def main_guard(main):
    """Run main(); a user mistake ends with its one-line message instead of a stack trace."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

# ----------------------------------------------------------------------------- run setup

@dataclass
class Run:
    """What setup() decided for this process."""
    device: torch.device
    rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.float32   # autocast dtype (float32 = no autocast)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def setup(cfg):
    """Device, DDP under torchrun, autocast dtype, seeds, TF32. Every rank seeds the same, so every rank
    builds the same initial model; call seed_rank() before drawing per-rank randomness (masks, sampling)."""
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    use_cuda = cfg.device == 'cuda' or (cfg.device == 'auto' and torch.cuda.is_available())
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    if cfg.dtype == 'auto':
        dtype = torch.bfloat16 if use_cuda else torch.float32
    else:
        dtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16}.get(cfg.dtype)
        if dtype is None:
            raise UserError(f"--dtype '{cfg.dtype}' is not one of auto, float32, bfloat16")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / 'config.json').write_text(json.dumps(asdict(cfg), indent=2))
    return Run(device=device, rank=rank, world_size=world, dtype=dtype)


def seed_rank(cfg, run):
    """Per-rank randomness from here on (MLM masks, negative sampling differ across ranks)."""
    torch.manual_seed(cfg.seed + 1 + run.rank)
    random.seed(cfg.seed + 1 + run.rank)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and returns this rank's shard."""

    @staticmethod
    def forward(ctx, x):  # (B, ...) -> (world*B, ...); every rank has the same B (drop_last=True)
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards)

    @staticmethod
    def backward(ctx, grad):  # every rank's loss depends on every shard: sum, then keep ours
        grad = grad.contiguous().clone()  # all_reduce works in place; the incoming gradient is not ours to change
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather(x):
    """Concatenate x (B, ...) from every rank along dim 0 -> (world*B, ...), keeping gradients:
    the backward sums each rank's gradient into the owner's shard, so with DDP averaging the
    parameters get exactly the gradient of the loss over the global batch."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def wrap_ddp(module, run):
    """DDP-wrap a trainable module. Parameters without requires_grad (frozen towers, momentum teachers) are not
    synchronised; buffers are not broadcast each step (no BatchNorm here, and feature queues are kept identical on
    every rank by enqueueing gathered features, so re-sending them would only cost bandwidth)."""
    if not run.distributed:
        return module
    import inspect
    from torch.nn.parallel import DistributedDataParallel
    options = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = 'forward_sync_buffers' if 'forward_sync_buffers' in options else 'broadcast_buffers'  # torch 2.15
    return DistributedDataParallel(module, device_ids=[run.device.index] if run.device.type == 'cuda' else None,
                                   **{no_buffer_sync: False})


def teardown(run):
    """End the process group at the end of a torchrun run (an open one makes torch warn or abort at exit). Drop the
    DDP wrappers first: a reducer that outlives its process group can abort the process at exit."""
    if run.distributed and dist.is_initialized():
        dist.barrier()  # no rank may tear down while another still talks to it
        dist.destroy_process_group()


def unwrap(module):
    """The plain module under DDP and torch.compile wrappers (so checkpoint keys never carry
    'module.' or '_orig_mod.' prefixes)."""
    while hasattr(module, 'module') or hasattr(module, '_orig_mod'):
        module = getattr(module, 'module', None) or module._orig_mod
    return module

# ----------------------------------------------------------------------------- optimisation

def lr_at(step, cfg):
    """Linear warm-up to cfg.lr over warmup_steps, then cosine down to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(module, weight_decay, exclude=(), **group_options):
    """Two AdamW groups of a module's trainable parameters but `exclude`: matrices decay, 1-D params (biases,
    norms, temperature) do not. Extra options (e.g. lr_scale=10) are stored in both groups."""
    params = [p for p in module.parameters() if p.requires_grad and not any(p is q for q in exclude)]
    return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay, **group_options),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0, **group_options)]


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)

# ----------------------------------------------------------------------------- checkpoints

def _rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                python=random.getstate(),
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    kind, key, *rest = state['numpy']
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))


def save_checkpoint(path, method, model, optimizer, step, cfg, **extra):
    """Model, optimizer, step, RNG states and config, written atomically (temp file + rename) so a
    crash mid-write never leaves a broken ckpt.pt. Call on rank 0."""
    state = dict(method=method, model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                 step=step, config=asdict(cfg), rng=_rng_state(), **extra)
    path = Path(path)
    tmp = path.with_suffix('.tmp')
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, method, map_location='cpu'):
    """Load a checkpoint with weights_only=True, checking that `method` wrote it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first (without --eval_only / --resume) "
                        f"or point --init_from at a ckpt.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise UserError(f"{path} is not a readable nanoalign checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get('method') != method:
        found = state.get('method', 'an unknown program') if isinstance(state, dict) else 'an unknown program'
        raise UserError(f"{path} was written by {found}, not {method}; point --init_from / --out_dir "
                        f"at a checkpoint of {method}")
    return state


def restore(state, model, optimizer=None, path='the checkpoint', flags='the model sizes or backbones'):
    """Put a checkpoint back: weights, and for --resume the optimizer and the RNG streams -> its step. A checkpoint
    of another shape is a UserError that names the file and the flags that decide the shapes."""
    try:
        unwrap(model).load_state_dict(state['model'])
        if optimizer is not None:
            optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} does not fit this model; were {flags} different? "
                        f"({str(e).splitlines()[0][:200]})") from None
    if optimizer is not None:
        set_rng_state(state['rng'])
    return state['step']


def load_into(path, method, model, optimizer=None, flags='the model sizes or backbones'):
    """load_checkpoint + restore -> the checkpoint (its extra entries, e.g. a stage, stay readable)."""
    state = load_checkpoint(path, method)
    restore(state, model, optimizer, path, flags)
    return state


def check_finite(loss, step, cfg):
    """A NaN / inf loss stops the run; the last good checkpoint stays as it was."""
    if not torch.isfinite(loss):
        ckpt = Path(cfg.out_dir) / 'ckpt.pt'
        kept = f"the last good checkpoint is {ckpt}" if ckpt.exists() else "no checkpoint was written yet"
        raise UserError(f"loss is {loss.item()} at step {step}; stopped, {kept}. "
                        f"Try a lower --lr or --dtype float32")

# ----------------------------------------------------------------------------- logging & speed

class Logger:
    """tqdm bar with the running loss, one JSON line per logged step in log.jsonl; rank 0 only."""

    def __init__(self, cfg, run, start_step=0):
        self.cfg, self.run = cfg, run
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * run.world_size
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not run.is_main, dynamic_ncols=True)
        mode = 'a' if cfg.resume else 'w'
        self.file = open(Path(cfg.out_dir) / 'log.jsonl', mode) if run.is_main else None
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.train_seconds, self.steps_done = 0.0, 0

    def step(self, step, losses, lr):
        """Call after optimizer step `step` (0-based) with the losses as floats."""
        now = time.perf_counter()
        self.train_seconds += now - self.last_time
        self.steps_done += step + 1 - self.last_step
        self.bar.update(step + 1 - self.last_step)
        self.bar.set_postfix(loss=f"{losses.get('loss', 0.0):.4f}")
        if self.file and ((step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.max_steps):
            rate = self.samples_per_step * self.steps_done / max(self.train_seconds, 1e-9)
            row = dict(step=step + 1, lr=lr, samples_per_s=round(rate, 2), **{k: round(v, 6) for k, v in losses.items()})
            self.file.write(json.dumps(row) + '\n')
            self.file.flush()
        self.last_time, self.last_step = time.perf_counter(), step + 1

    def log(self, row):
        """A free-form line (e.g. validation metrics) in log.jsonl."""
        if self.file:
            self.file.write(json.dumps(row) + '\n')
            self.file.flush()

    def print(self, *msg):
        if self.run.is_main:
            tqdm.write(' '.join(str(m) for m in msg))

    def pause(self):
        """Exclude what follows (evaluation, checkpointing) from the training time."""
        self.train_seconds += time.perf_counter() - self.last_time

    def resume(self):
        self.last_time = time.perf_counter()

    def speed(self, flops_per_sample=None):
        """The speed keys of metrics.json (and mfu on CUDA when the model's flops are given)."""
        rate = self.samples_per_step * self.steps_done / max(self.train_seconds, 1e-9)
        out = dict(train_samples_per_s=round(rate, 2), train_seconds=round(self.train_seconds, 2),
                   peak_mem_mb=round(peak_memory_mb(self.run.device), 1))
        peak = peak_flops(self.run.device)
        if flops_per_sample and peak:
            out['mfu'] = round(100 * flops_per_sample * rate / (peak * self.run.world_size), 2)
        return out

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def peak_memory_mb(device):
    """Peak CUDA memory allocated; on CPU the process's peak resident memory."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched against the device name;
# the more specific names come first (an "H100 PCIe" is not an SXM H100).
PEAK_BF16_FLOPS = [('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
                   ('GH200', 989e12), ('B200', 2250e12), ('A100', 312e12), ('A800', 312e12),
                   ('L40S', 362e12), ('L40', 181e12), ('A10G', 70e12), ('A10', 125e12), ('L4', 121e12),
                   ('RTX 4090', 165e12), ('RTX 3090', 71e12), ('A6000', 155e12), ('V100', 125e12),
                   ('T4', 65e12)]


def peak_flops(device):
    """The device's peak bf16 FLOP/s by name, or None (CPU, or a GPU not in the table: no MFU then)."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


class count_flops:
    """`with count_flops(on) as counted: <forward + backward>` leaves in counted.flops the FLOPs that torch's
    FlopCounterMode saw in the block (None when off). Methods count their first CUDA step this way to get the
    model FLOPs per sample for MFU, instead of a hand-written formula per architecture."""

    def __init__(self, on):
        self.on, self.flops, self.mode = on, None, None

    def __enter__(self):
        if self.on:
            from torch.utils.flop_counter import FlopCounterMode
            self.mode = FlopCounterMode(display=False)
            self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.__exit__(*exc)
            self.flops = self.mode.get_total_flops()


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def write_metrics(cfg, metrics):
    """metrics.json: one flat object of numbers."""
    metrics = {k: (round(float(v), 4) if v == v else None) for k, v in metrics.items()}
    (Path(cfg.out_dir) / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics

# ------------------------------------------------------------------ shared nn blocks + HF weight loading
# Own ViT and BERT-style modules in plain PyTorch, so a method can open them up (cross-attention, causal masks,
# attention maps, score hooks) without fighting a library. Pretrained weights are copied in from a Hugging Face
# model object by an explicit key map (nanoGPT / nanoVLM style); HF names are those of transformers >= 5
# (from_pretrained already renames old checkpoints, e.g. ViT's attention.attention.query -> attention.q_proj).

def padding_mask(attention_mask, dtype=torch.float32):
    """(B, L) with 1 = token, 0 = pad -> additive mask (B, 1, 1, L): 0 where visible, finfo.min where hidden.
    finfo.min rather than -1e10 (which overflows to -inf in fp16) or -inf (a row with no visible key gives NaN)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def causal_mask(L, device=None, dtype=torch.float32):
    """(L, L) additive mask: query i sees keys j <= i. Combine with a padding mask by adding them."""
    return torch.full((L, L), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)


def right_to_left_padding(x, mask):
    """Rows padded on the right -> the same rows padded on the left, as batched decoder-only generation needs (each
    row continues right after its own last token): every row is rotated by its number of pads.
    x (B, T, ...) and mask (B, T) 1 = token -> both rotated."""
    T = mask.shape[1]
    order = (torch.arange(T, device=mask.device) - (mask == 0).sum(1, keepdim=True)) % T     # (B, T)
    return x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand_as(x)), mask.gather(1, order)


def checkpointed(fn, *args, on=False, **kwargs):
    """fn(*args, **kwargs), with activation checkpointing when `on` and autograd is recording: activations are
    recomputed in backward instead of stored. Stacks call it per layer: x = checkpointed(layer, x, mask, on=...)."""
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
    """Multi-head attention: self-attention (context=None) or cross-attention to context (B, Lk, kv_dim).
    Split in project -> scores -> attend so a method can change one step: a subclass or a custom layer forward
    can rescale k and v per token between project() and attend() (token gating); `score_hook(scores, mask)`
    -> scores edits the masked score matrix before the softmax (top-k sparsity). The fused SDPA kernel is used
    only when neither the probabilities nor a hook are needed; both paths compute the same thing."""

    def __init__(self, dim, heads, qkv_bias=True, kv_dim=None, dropout=0.0):
        super().__init__()
        self.heads, self.dropout, self.score_hook = heads, dropout, None
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(kv_dim or dim, dim, bias=qkv_bias)
        self.v = nn.Linear(kv_dim or dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None, return_attn=False):
        """x (B, Lq, dim), mask additive, broadcastable to (B, heads, Lq, Lk) -> (out (B, Lq, dim), probs):
        probs (B, heads, Lq, Lk) when return_attn, else None. One return type keeps callers uniform."""
        q, k, v = self.project(x, x if context is None else context)
        return self.attend(q, k, v, mask, return_attn)

    def project(self, x, context):  # -> q (B, H, Lq, Dh), k and v (B, H, Lk, Dh)
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
        return split(self.q(x)), split(self.k(context)), split(self.v(context))

    def scores(self, q, k, mask):  # (B, H, Lq, Lk): scaled dot products + mask, then the hook if any
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s + mask
        return s if self.score_hook is None else self.score_hook(s, mask)

    def attend(self, q, k, v, mask=None, return_attn=False):
        if mask is not None:
            # Summing two masks (min + min) or casting to fp16 gives -inf, and a row of -inf is NaN after the
            # softmax; clamping to finfo.min keeps a row with no visible key finite (uniform weights, ignored later).
            mask = mask.to(q.dtype).clamp(min=torch.finfo(q.dtype).min)
        p_drop = self.dropout if self.training else 0.0
        probs = None
        if return_attn or self.score_hook is not None:
            probs = torch.softmax(self.scores(q, k, mask).float(), dim=-1).to(v.dtype)  # (B, H, Lq, Lk)
            out = F.dropout(probs, p_drop, self.training) @ v                              # (B, H, Lq, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self.proj(out.transpose(1, 2).flatten(2)), probs  # (B, Lq, dim)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act='gelu'):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), activation(act), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, heads, mlp_dim, act='gelu', eps=1e-6, qkv_bias=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), MLP(dim, mlp_dim, act)

    def forward(self, x, mask=None):  # (B, L, D)
        x = x + self.attn(self.norm1(x), mask=mask)[0]
        return x + self.mlp(self.norm2(x))


def interpolate_pos_embed(pos_embed, n_special, grid):
    """(1, n_special + g*g, D) -> (1, n_special + grid*grid, D): bicubic resize of the patch-position grid, the
    CLS/distillation positions kept, as ALBEF's interpolate_pos_embed and HF's interpolate_pos_encoding do."""
    special, patches = pos_embed[:, :n_special], pos_embed[:, n_special:]
    old, D = math.isqrt(patches.shape[1]), patches.shape[2]
    if old == grid:
        return pos_embed
    patches = patches.reshape(1, old, old, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode='bicubic', align_corners=False)
    return torch.cat([special, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D)], dim=1)


class VisionTransformer(nn.Module):
    """Pre-LN ViT: patches + [CLS] (+ DeiT's distillation token) + learned positions -> (optional pre-LN, CLIP)
    -> blocks -> final LN. Returns all tokens (B, n_special + N, D). With final_norm=False (CLIP) the output
    is the un-normalised residual stream, exactly HF CLIP's last_hidden_state; `self.norm` then holds CLIP's
    post_layernorm, which HF applies to the CLS only: vit.norm(out[:, 0]) == HF pooler_output."""

    def __init__(self, image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072, channels=3,
                 distill_token=False, pre_norm=False, final_norm=True, patch_bias=True, act='gelu', eps=1e-6,
                 qkv_bias=True):
        super().__init__()
        self.patch_size, self.final_norm, self.grad_checkpointing = patch_size, final_norm, False
        self.n_special = 2 if distill_token else 1
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if distill_token else None
        n_tokens = self.n_special + (image_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.pre_norm = nn.LayerNorm(dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_dim, act, eps, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, images):  # (B, C, H, W) -> (B, n_special + N, D)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
        special = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        x = torch.cat([t.expand(len(x), -1, -1) for t in special] + [x], dim=1) + self.pos_embed
        x = self.pre_norm(x)
        for block in self.blocks:
            x = checkpointed(block, x, on=self.grad_checkpointing)
        return self.norm(x) if self.final_norm else x


class BertEmbeddings(nn.Module):
    """word + position + token-type-0 embeddings -> LayerNorm -> dropout (every method feeds one segment)."""

    def __init__(self, vocab_size, dim, max_len=512, type_vocab=2, eps=1e-12, dropout=0.0, pad_id=0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_id)  # pad row gets no gradient, as in HF
        self.position, self.token_type = nn.Embedding(max_len, dim), nn.Embedding(type_vocab, dim)
        self.norm, self.drop = nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, input_ids, offset=0):  # (B, L) -> (B, L, D); offset = position of the first token (KV cache)
        pos = torch.arange(offset, offset + input_ids.shape[1], device=input_ids.device)
        return self.drop(self.norm(self.word(input_ids) + self.position(pos) + self.token_type.weight[0]))


class BertLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + self_attn(x)) -> [x = LN(x + cross_attn(x, context))] -> x = LN(x + FFN(x)).
    Self-attention mask: padding and/or causal (additive). Cross-attention is skipped when context is None (as HF
    does), so a fusion layer can also run text-only."""

    def __init__(self, dim, heads, mlp_dim, cross_attention=False, cross_dim=None, eps=1e-12, act='gelu',
                 dropout=0.0):
        super().__init__()
        self.self_attn, self.norm1 = Attention(dim, heads, dropout=dropout), nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, heads, kv_dim=cross_dim, dropout=dropout) if cross_attention else None
        self.norm_cross = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.mlp, self.norm2, self.drop = MLP(dim, mlp_dim, act), nn.LayerNorm(dim, eps=eps), nn.Dropout(dropout)

    def forward(self, x, mask=None, context=None, context_mask=None, return_attn=False):
        """x (B, L, D), context (B, Lc, cross_dim) -> x (B, L, D), or (x, (self_probs, cross_probs))."""
        h, self_probs = self.self_attn(x, mask=mask, return_attn=return_attn)
        x = self.norm1(x + self.drop(h))
        cross_probs = None
        if self.cross_attn is not None and context is not None:
            h, cross_probs = self.cross_attn(x, context, context_mask, return_attn)
            x = self.norm_cross(x + self.drop(h))
        x = self.norm2(x + self.drop(self.mlp(x)))
        return (x, (self_probs, cross_probs)) if return_attn else x


class MLMHead(nn.Module):
    """BERT's LM head: dense -> act -> LN -> decoder whose weight IS the word embedding matrix (tied), own bias."""

    def __init__(self, word_embeddings, eps=1e-12, act='gelu'):
        super().__init__()
        vocab_size, dim = word_embeddings.weight.shape
        self.dense, self.act, self.norm = nn.Linear(dim, dim), activation(act), nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)
        self.decoder.weight = word_embeddings.weight

    def forward(self, x):  # (B, L, D) -> logits (B, L, vocab)
        return self.decoder(self.norm(self.act(self.dense(x))))


def copy_hf_weights(module, hf_state, key_map):
    """Copy tensors from an HF state dict into module. key_map: {our module or parameter name: HF name}; a
    parameter follows its module ('attn.q.weight' <- key_map['attn.q'] + '.weight'). Returns our keys that the
    HF model lacks (left at init). A key of ours that no entry covers is a bug in the map and raises."""
    loaded, new = {}, []
    for key, tensor in module.state_dict().items():
        ours = next((p for p in key_map if key == p or key.startswith(p + '.')), None)
        if ours is None:
            raise KeyError(f"no HF key mapped for {key!r}")
        theirs = key_map[ours] + key[len(ours):]
        if theirs in hf_state:
            loaded[key] = hf_state[theirs].reshape(tensor.shape)  # CLIP stores cls (D,) and positions (N, D)
        else:
            new.append(key)
    module.load_state_dict(loaded, strict=False)
    return new


def vit_from_hf(hf_model, image_size=None):
    """HF ViTModel / DeiTModel / CLIPVisionModel (or a model wrapping one) -> VisionTransformer whose output equals
    HF's last_hidden_state. image_size other than the checkpoint's interpolates the position embeddings.
    Not copied: ViT/DeiT's pooler (dense+tanh, unused by the methods) and the MIM mask token."""
    for attr in ('vision_model', 'vit', 'deit'):  # CLIPModel, *ForImageClassification wrap the encoder
        hf_model = getattr(hf_model, attr, hf_model)
    c = hf_model.config
    if c.model_type not in ('vit', 'deit', 'clip_vision_model'):
        raise ValueError(f"vit_from_hf supports ViT, DeiT and CLIP vision models, got {c.model_type!r}")
    clip, image_size = c.model_type == 'clip_vision_model', image_size or c.image_size
    vit = VisionTransformer(image_size, c.patch_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                            c.intermediate_size, c.num_channels, distill_token=c.model_type == 'deit',
                            pre_norm=clip, final_norm=not clip, patch_bias=not clip, act=c.hidden_act,
                            eps=c.layer_norm_eps, qkv_bias=getattr(c, 'qkv_bias', True))
    e = 'embeddings.'
    if clip:
        key_map = {'cls_token': e + 'class_embedding', 'pos_embed': e + 'position_embedding.weight',
                   'patch_embed': e + 'patch_embedding', 'pre_norm': 'pre_layrnorm', 'norm': 'post_layernorm'}
        layer, block = 'encoder.layers.{}.', {'norm1': 'layer_norm1', 'attn.proj': 'self_attn.out_proj',
                                               'norm2': 'layer_norm2', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
                                               **{f'attn.{t}': f'self_attn.{t}_proj' for t in 'qkv'}}
    else:
        key_map = {'cls_token': e + 'cls_token', 'dist_token': e + 'distillation_token',
                   'pos_embed': e + 'position_embeddings', 'patch_embed': e + 'patch_embeddings.projection',
                   'norm': 'layernorm'}
        layer, block = 'layers.{}.', {'norm1': 'layernorm_before', 'attn.proj': 'attention.o_proj',
                                      'norm2': 'layernorm_after', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2',
                                      **{f'attn.{t}': f'attention.{t}_proj' for t in 'qkv'}}
    for i in range(c.num_hidden_layers):
        key_map.update({f'blocks.{i}.{ours}': layer.format(i) + theirs for ours, theirs in block.items()})
    state = hf_model.state_dict()
    pos = state[key_map['pos_embed']].reshape(1, -1, c.hidden_size)
    state[key_map['pos_embed']] = interpolate_pos_embed(pos, vit.n_special, image_size // c.patch_size)
    missing = copy_hf_weights(vit, state, key_map)
    if missing:
        raise KeyError(f"HF {type(hf_model).__name__} lacks {missing}")
    return vit


_BERT_LAYER_KEYS = {  # our BertLayer module -> HF BertLayer module
    'self_attn.proj': 'attention.output.dense', 'norm1': 'attention.output.LayerNorm',
    'cross_attn.proj': 'crossattention.output.dense', 'norm_cross': 'crossattention.output.LayerNorm',
    'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense', 'norm2': 'output.LayerNorm',
    **{f'{a}.{t}': f'{b}.self.{name}' for a, b in (('self_attn', 'attention'), ('cross_attn', 'crossattention'))
       for t, name in (('q', 'query'), ('k', 'key'), ('v', 'value'))}}


def bert_from_hf(hf_model, cross_layers=(), cross_dim=None):
    """HF BertModel or BertForMaskedLM -> (BertEmbeddings, nn.ModuleList of BertLayer, MLMHead, new_keys).
    Layers whose index is in cross_layers get cross-attention to a context of width cross_dim (default hidden);
    its weights are new unless the HF model has them. The MLM head comes from BertForMaskedLM.cls.predictions
    (new for a bare BertModel). new_keys lists every parameter left at init, for the caller to report.
    Dropout: HF's hidden_dropout_prob is used for hidden states and attention probabilities alike."""
    bert = getattr(hf_model, 'bert', hf_model)
    c, state, p = bert.config, hf_model.state_dict(), 'bert.' if bert is not hf_model else ''
    emb = BertEmbeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                         c.layer_norm_eps, c.hidden_dropout_prob, c.pad_token_id)
    e = p + 'embeddings.'
    new = copy_hf_weights(emb, state, {'word': e + 'word_embeddings', 'position': e + 'position_embeddings',
                                       'token_type': e + 'token_type_embeddings', 'norm': e + 'LayerNorm'})
    layers = nn.ModuleList()
    for i in range(c.num_hidden_layers):
        layers.append(BertLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, i in cross_layers,
                                cross_dim, c.layer_norm_eps, c.hidden_act, c.hidden_dropout_prob))
        key_map = {ours: f'{p}encoder.layer.{i}.{theirs}' for ours, theirs in _BERT_LAYER_KEYS.items()}
        new += [f'layers.{i}.{k}' for k in copy_hf_weights(layers[i], state, key_map)]
    head = MLMHead(emb.word, c.layer_norm_eps, c.hidden_act)
    new += ['mlm_head.' + k for k in copy_hf_weights(head, state, {
        'dense': 'cls.predictions.transform.dense', 'norm': 'cls.predictions.transform.LayerNorm',
        'decoder.weight': e + 'word_embeddings.weight', 'decoder.bias': 'cls.predictions.bias'})]
    return emb, layers, head, new


# ----------------------------------------------------------------------------- backbones

BACKBONE_KINDS = {  # kind -> the Hugging Face model types accepted for it
    'vision': ('vit', 'deit', 'clip', 'clip_vision_model', 'siglip', 'siglip_vision_model'),
    'text': ('bert', 'roberta', 'distilbert', 'mpnet', 'xlm-roberta'),
    'mlm': ('bert', 'roberta', 'distilbert', 'xlm-roberta'),
    'lm': None,  # any causal LM AutoModelForCausalLM knows
}


def load_backbone(name, kind, dtype=None):
    """A pretrained backbone by Hugging Face id, local path, or built-in name (shapes-tiny-vision / -text /
    -lm, trained on first use and then loaded through the same from_pretrained path as any checkpoint).
    kind: 'vision' (ViT / DeiT / CLIP / SigLIP vision tower), 'text' (BERT-family encoder),
    'mlm' (encoder + masked-LM head), 'lm' (causal LM). Returns the HF model."""
    import transformers as tf
    import backbones  # here, not at the top: backbones.py trains with common's schedule
    path = backbones.builtin_backbone(name) if name.startswith('shapes-tiny') else name
    try:
        config = tf.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _unknown_backbone(name, 'config.json', e) from None
    accepted = BACKBONE_KINDS[kind]
    if accepted is not None and config.model_type not in accepted:
        raise UserError(f"backbone '{name}' is a {config.model_type} model, which is not a {kind} backbone "
                        f"(expected one of: {', '.join(accepted)})")
    if kind == 'vision':
        cls = {'clip': tf.CLIPVisionModel, 'siglip': tf.SiglipVisionModel}.get(config.model_type, tf.AutoModel)
    else:
        cls = {'text': tf.AutoModel, 'mlm': tf.AutoModelForMaskedLM, 'lm': tf.AutoModelForCausalLM}[kind]
    return cls.from_pretrained(path, dtype=dtype or torch.float32)


def load_tokenizer(name):
    """The tokenizer saved with a backbone. The built-ins carry the ShapesWorld word-level tokenizer, loaded as the
    plain fast tokenizer it is: AutoTokenizer would pick the class of the model's type, and for the built-in LM's
    qwen2 that is a byte-level BPE tokenizer that splits the words wrongly."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    builtin = name.startswith('shapes-tiny')
    import backbones
    path = backbones.builtin_backbone(name) if builtin else name
    try:
        return (PreTrainedTokenizerFast if builtin else AutoTokenizer).from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _unknown_backbone(name, 'tokenizer files', e) from None


def _unknown_backbone(name, needed, error):
    import backbones
    if Path(name).is_dir():
        return UserError(f"backbone folder '{name}' has no {needed} that transformers can read "
                         f"({type(error).__name__}); save the model and its tokenizer there with save_pretrained")
    return UserError(f"unknown backbone '{name}': not a local folder, and not a model that could be fetched from the "
                     f"Hugging Face Hub ({type(error).__name__}). Give a Hub id (e.g. bert-base-uncased), a local "
                     f"path, or one of {', '.join(backbones.BUILTIN_BACKBONES)}")


# ----------------------------------------------------------------------------- metrics
# Every metric is returned on the papers' scale (percent, CIDEr x100), so metrics.json reads like their tables.


def retrieval_metrics(sims, image_texts, texts=None, sims_t2i=None):
    """Recall@{1,5,10} image->text (tr) and text->image (ir) in percent, and their mean (rmean).
    sims: (N_images, N_texts) scores; sims_t2i: (N_texts, N_images) text->image scores when they are not sims.T
    (re-ranking scores each direction's top-k on its own); image_texts[i]: indices of image i's captions; texts: the caption
    strings. With texts, captions of identical text are interchangeable: a text is correct for every image
    that has a caption with that exact text (ShapesWorld images can share a description, and no model can
    break such ties)."""
    sims = torch.as_tensor(sims).float()  # (I, T)
    if sims.isnan().any():
        raise ValueError('retrieval_metrics: sims contains NaN')
    n_img, n_txt = sims.shape
    if texts is not None and len(texts) != n_txt:
        raise ValueError(f'retrieval_metrics: {len(texts)} texts for {n_txt} columns of sims')
    if texts is None:
        correct = torch.zeros(n_img, n_txt, dtype=torch.bool)  # (I, T)
        for i, ids in enumerate(image_texts):
            correct[i, ids] = True
    else:
        ids_of = {}
        text_id = torch.tensor([ids_of.setdefault(t, len(ids_of)) for t in texts])  # (T,) one id per distinct string
        has_text = torch.zeros(n_img, len(ids_of), dtype=torch.bool)  # (I, distinct texts)
        for i, ids in enumerate(image_texts):
            has_text[i, text_id[ids]] = True
        correct = has_text[:, text_id]  # (I, T)
    correct = correct.to(sims.device)
    for name, rows in (('image', correct.any(1)), ('text', correct.any(0))):
        if not rows.all():
            raise ValueError(f'retrieval_metrics: {name} {int((~rows).nonzero()[0])} has no correct match in image_texts')

    def recalls(scores, ok):  # scores, ok: (queries, candidates)
        best = scores.masked_fill(~ok, -math.inf).amax(1, keepdim=True)  # (Q, 1) best correct candidate
        # rank = wrong candidates scoring at least as high. Ties count against the model, so a model that
        # gives every pair the same score gets chance-level recall, not 100.
        rank = ((scores >= best) & ~ok).sum(1)  # (Q,)
        return [100.0 * (rank < k).float().mean().item() for k in (1, 5, 10)]

    sims_t2i = sims.T if sims_t2i is None else torch.as_tensor(sims_t2i).float().to(sims.device)
    out = dict(zip(('tr1', 'tr5', 'tr10', 'ir1', 'ir5', 'ir10'), recalls(sims, correct) + recalls(sims_t2i, correct.T)))
    out['rmean'] = sum(out.values()) / 6
    return out


def _ptb_like(sentence):
    """Pure-Python stand-in for the Stanford PTBTokenizer as pycocoevalcap runs it (-lowerCase, then the
    tokens in PUNCTUATIONS dropped). It reproduces it on ordinary captions: lowercasing, contractions
    ("isn't" -> "is n't", "dog's" -> "dog 's"), punctuation split off (but not inside numbers such as 3.5
    or 1,000, or initials such as u.s.), quotes dropped, brackets kept as -lrb- -rrb- ... (Java lowercases
    them, so they escape PUNCTUATIONS). Rarer cases differ (e.g. "mr." keeps its dot in Java, "gonna")."""
    s = ' ' + sentence.lower() + ' '
    s = re.sub(r'[()\[\]{}]', lambda m: ' -%s- ' % {'(': 'lrb', ')': 'rrb', '[': 'lsb', ']': 'rsb',
                                                      '{': 'lcb', '}': 'rcb'}[m.group()], s)
    s = re.sub(r'["`]|(?<![a-z0-9])\'|\'(?![a-z0-9])', ' ', s)  # quote marks go, apostrophes in words stay
    s = re.sub(r'(\.\.\.|--|[;!?$%&])', r' \1 ', s)
    s = re.sub(r'(?<!\d)([,:])|([,:])(?!\d)', r' \1\2 ', s)   # 1,000 and 5:30 stay whole
    s = re.sub(r"n't\b", " n't", s)
    s = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", s)
    tokens = []
    for tok in s.split():
        if len(tok) > 1 and tok.endswith('.') and tok != '...' and not re.fullmatch(r'([a-z]\.)+', tok):
            tokens += [tok[:-1], '.']                           # sentence-final dot, not "u.s."
        else:
            tokens.append(tok)
    return ' '.join(t for t in tokens if t not in PUNCTUATIONS)


def _tokenize(captions):
    """{key: [sentence, ...]} -> same with PTB-tokenised sentences: Java when present (the papers' exact
    tokenisation), else _ptb_like. One JVM start for the whole dict."""
    if shutil.which('java'):
        # newlines would shift PTBTokenizer's one-line-per-caption output, so collapse all whitespace
        return PTBTokenizer().tokenize({k: [{'caption': ' '.join(c.split())} for c in v] for k, v in captions.items()})
    return {k: [_ptb_like(c) for c in v] for k, v in captions.items()}


def _spice_ready():
    # Spice() downloads Stanford CoreNLP (~400 MB) when its jars are missing; only run it when they are there.
    jar = os.path.join(spice_models.SPICEDIR, spice_models.SPICELIB, spice_models.JAR)
    return bool(shutil.which('java')) and os.path.exists(jar + '.jar') and os.path.exists(jar + '-models.jar')


def caption_metrics(predictions, references):
    """COCO caption metrics x100: bleu4 meteor rouge_l cider (+ spice when its CoreNLP jars are present).
    predictions: {id: caption}; references: {id: [caption, ...]}. The pycocoevalcap scorers are called one
    by one (COCOEvalCap.evaluate would try to download CoreNLP for SPICE). Without Java: no meteor key."""
    if predictions.keys() != references.keys():
        missing = set(predictions) ^ set(references)
        raise ValueError(f'caption_metrics: ids {sorted(missing, key=str)[:5]} are in only one of predictions / references')
    if not all(references.values()):
        raise ValueError('caption_metrics: every id needs at least one reference caption')
    tokens = _tokenize({**{('res', k): [v] for k, v in predictions.items()},
                        **{('gts', k): v for k, v in references.items()}})
    res = {k: tokens[('res', k)] for k in predictions}  # {id: [tokenised prediction]}
    gts = {k: tokens[('gts', k)] for k in predictions}  # {id: [tokenised references]}
    out = {'bleu4': 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3],
           'rouge_l': 100 * Rouge().compute_score(gts, res)[0],
           'cider': 100 * Cider().compute_score(gts, res)[0]}
    if shutil.which('java'):
        out['meteor'] = 100 * Meteor().compute_score(gts, res)[0]
    else:
        warnings.warn('caption_metrics: `java` is not on PATH, so METEOR is left out and PTB tokenisation uses a '
                      'pure-Python approximation; install a Java runtime for the papers\' exact numbers')
    if _spice_ready():
        out['spice'] = 100 * Spice().compute_score(gts, res)[0]
    return out


def auroc(scores, labels):
    """Area under the ROC curve x100 (the papers' scale, like every other metric): the chance that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U from average ranks).
    NaN, with a warning, when labels hold a single class (the area is undefined)."""
    s = torch.as_tensor(scores).detach().double().cpu().flatten().numpy()
    y = torch.as_tensor(labels).detach().cpu().flatten().numpy()
    if len(s) != len(y) or np.isnan(s).any() or not np.isin(y, (0, 1)).all():
        raise ValueError(f'auroc: need one 0/1 label per score and no NaN score (got {len(s)} scores, labels {np.unique(y)[:5]})')
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f'auroc: all {len(y)} labels are {"positive" if n_neg == 0 else "negative"}, AUROC is undefined (NaN)')
        return float('nan')
    order = np.argsort(s, kind='stable')
    _, first, count = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (count + 1) / 2, count)  # 1-based ranks, tied scores share their mean rank
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2              # pairs (pos, neg) with pos ranked higher
    return 100.0 * u / (n_pos * n_neg)


# ----------------------------------------------------------------------------- token pictures

SHADE = (31, 119, 180)  # value 1 (value 0 is white)
MARK = (214, 39, 40)    # outline of marked tokens
PAD, PANEL_W, IMAGE_MIN, IMAGE_MAX = 12, 560, 192, 384  # picture layout in pixels


def _shade(v):
    v = min(max(float(v), 0.0), 1.0)
    return tuple(round(255 + v * (c - 255)) for c in SHADE)


def render_tokens(image, rows, path, title=None, mark_label='marked'):
    """Save a PNG of the image beside rows of tokens shaded white -> blue by a per-token value, with a legend.
    image: PIL image, or a (3, H, W) tensor normalised with CLIP_MEAN / CLIP_STD (what data.py's transforms
    give; it is un-normalised here). rows: [(label, [(token, value in [0, 1], marked), ...]), ...]; values
    are clipped to [0, 1]; marked tokens get a red outline. Returns path."""
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu() * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        image = Image.fromarray((x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())  # (H, W, 3)
    image = image.convert('RGB')
    if max(image.size) < IMAGE_MIN:   # ShapesWorld's 64 px: blow up by a whole factor, nearest keeps pixels crisp
        f = math.ceil(IMAGE_MIN / max(image.size))
        image = image.resize((image.width * f, image.height * f), Image.NEAREST)
    elif max(image.size) > IMAGE_MAX:
        image.thumbnail((IMAGE_MAX, IMAGE_MAX), Image.BICUBIC)
    font = ImageFont.load_default(size=14)
    line_h, gap = 22, 4
    x0 = 2 * PAD + image.width        # left edge of the text panel

    # lay out first (to know the height), then draw
    y = PAD + (line_h + PAD if title else 0)
    top = y
    items = []  # (kind, x, y, text, value, marked)
    for label, tokens in rows:
        items.append(('label', x0, y, label, 0, False))
        x, y = x0, y + line_h
        for token, value, marked in tokens:
            w = font.getlength(token) + 8
            if x + w > x0 + PANEL_W and x > x0:  # wrap
                x, y = x0, y + line_h + gap
            items.append(('token', x, y, token, value, marked))
            x += w + gap
        y += line_h + PAD
    legend_y = y
    height = max(legend_y + line_h + PAD, top + image.height + PAD)

    canvas = Image.new('RGB', (x0 + PANEL_W + PAD, height), 'white')
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), title, fill='black', font=font)
    canvas.paste(image, (PAD, top))
    for kind, x, y, text, value, marked in items:
        if kind == 'label':
            draw.text((x, y + 3), text, fill=(90, 90, 90), font=font)
            continue
        box = (x, y, x + font.getlength(text) + 8, y + line_h)
        draw.rectangle(box, fill=_shade(value), outline=MARK if marked else (200, 200, 200), width=2 if marked else 1)
        draw.text((x + 4, y + 3), text, fill='white' if value > 0.6 else 'black', font=font)
    # legend: the colour ramp from 0 to 1, then what a red outline means
    draw.text((x0, legend_y + 3), '0', fill='black', font=font)
    for i in range(160):
        draw.line((x0 + 14 + i, legend_y + 4, x0 + 14 + i, legend_y + line_h - 4), fill=_shade(i / 159))
    draw.text((x0 + 180, legend_y + 3), '1', fill='black', font=font)
    draw.rectangle((x0 + 210, legend_y, x0 + 230, legend_y + line_h), outline=MARK, width=2)
    draw.text((x0 + 238, legend_y + 3), mark_label, fill='black', font=font)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    canvas.save(path)
    return path
