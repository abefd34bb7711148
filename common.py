"""common.py — what every nanoalign method shares, and nothing that belongs to one method:
config + CLI (RunConfig, parse_config), run setup (device, torchrun DDP / FSDP, autocast, seeds),
training (lr schedule, AdamW groups, checkpoints, two stages, logger, all_gather, speed / MFU),
metrics (retrieval, captioning, AUROC) and render_tokens. The backbones are in backbones.py."""
import dataclasses
import difflib
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as spice_models
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer
from torch.distributed.checkpoint import state_dict as dcp
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
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
    image_size: int = 224       # pixels (latents: a ShapesWorld stand-in's grid is image_size / 8)
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
    fsdp: bool = False          # FSDP2: shard params, grads, optimizer state over torchrun ranks
    num_workers: int = 0        # data loader workers
    max_bad_images: int = 0     # unreadable images to skip (counted) before stopping
    split_ratio: tuple = (0.9, 0.05, 0.05)  # train / val / test of an --ann_file without {split}
    predict: tuple = ()         # image files: print what the checkpoint makes of each, then stop
    seed: int = 0
    log_every: int = 10         # steps between log.jsonl lines


def parse_value(name, text, default):
    """The text of --name (a list: several values) as the type of the field's default."""
    if isinstance(default, tuple):  # items typed like the default's first, str if it is empty
        texts = text if isinstance(text, list) else text.split(',') if default else [text]
        return tuple(parse_value(name, t, default[0]) if default else t for t in texts)
    if isinstance(default, bool):
        if text.lower() not in ('true', 'false'):
            raise UserError(f"--{name} takes true or false, got '{text}'")
        return text.lower() == 'true'
    try:
        return type(default)(text)
    except ValueError:
        raise UserError(f"--{name} takes a {type(default).__name__}, got '{text}'") from None


RUN_ONLY = ('device', 'dtype', 'compile', 'resume', 'eval_only', 'num_workers')  # not the model's


def parse_config(config_cls, presets, argv=None, stem=None):
    """Flags are the field names (`--lr 1e-4` or `--lr=1e-4`); a tuple field takes a1,a2 or several
    values (`--predict a.jpg b.jpg`). `--data X` first applies presets[X] (overrides atop the method
    file), then explicit flags win; a class may list `renamed_flags`. With --predict the base is
    the config saved in the checkpoint (--init_from, else out_dir/ckpt.pt), not the preset."""
    argv = sys.argv[1:] if argv is None else list(argv)
    stem = stem or Path(sys.argv[0]).stem
    names = sorted(f.name for f in fields(config_cls))
    renamed = getattr(config_cls, 'renamed_flags', {})  # old flag -> its new name, for the hint
    defaults, flags, i = config_cls(), {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            raise UserError(f"unexpected argument '{arg}': flags look like --name value")
        name, sep, text = arg[2:].partition('=')
        if name not in names:
            close = ([renamed[name]] if name in renamed
                     else difflib.get_close_matches(name, names, n=1))
            hint = f"did you mean --{close[0]}?" if close else f"valid flags: {', '.join(names)}"
            raise UserError(f"unknown flag --{name}; {hint}")
        texts = [text] if sep else []  # --name=value, else the values that follow
        while not sep and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
            texts, i = texts + [argv[i + 1]], i + 1
            if not isinstance(getattr(defaults, name), tuple):
                break  # one value, unless the field is a tuple
        if not texts:
            raise UserError(f"--{name} needs a value")
        flags[name] = texts[0] if len(texts) == 1 else texts
        i += 1
    values = {k: parse_value(k, v, getattr(defaults, k)) for k, v in flags.items()}
    if 'predict' in values:  # a checkpoint carries its config: start from it, not its run's device
        path = values.get('init_from') or str(Path(values.get('out_dir') or Path('out') / stem,
                                                   'ckpt.pt'))
        saved = load_checkpoint(path, stem)['config']
        model = {k: v for k, v in saved.items() if k in names and k not in RUN_ONLY}
        return dataclasses.replace(defaults, **{**model, 'init_from': path, **values})
    data = values.get('data', defaults.data)
    if data not in presets:
        raise UserError(f"unknown --data '{data}'; choose one of: {', '.join(presets)}")
    cfg = dataclasses.replace(defaults, **{**presets[data], **values})  # explicit flags win
    if not cfg.out_dir:
        cfg.out_dir = str(Path('out') / stem)
    if (cfg.eval_only or cfg.resume) and cfg.data == 'json' and '{split}' not in cfg.ann_file:
        check_split(cfg, stem)
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
    fsdp: bool = False                   # --fsdp under torchrun: wrap_ddp shards (FSDP2), no DDP

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def autocast(self):  # float32: no autocast
        float32 = self.dtype == torch.float32
        return nullcontext() if float32 else torch.autocast(self.device.type, dtype=self.dtype)


def setup(cfg, supports_fsdp=False):
    """Device, DDP under torchrun, autocast dtype, seeds, TF32. Every rank seeds the same, so all
    build the same initial model; call seed_rank() before per-rank randomness (masks, sampling)."""
    if cfg.fsdp and not supports_fsdp:
        raise UserError("--fsdp: this method does not shard (its presets fit one GPU); drop it")
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; "
                        "use --device cpu or auto")
    use_cuda = cfg.device == 'cuda' or (cfg.device == 'auto' and torch.cuda.is_available())
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    device = torch.device('cpu')
    if use_cuda:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    auto = torch.bfloat16 if use_cuda else torch.float32
    dtype = {'auto': auto, 'float32': torch.float32, 'bfloat16': torch.bfloat16}.get(cfg.dtype)
    if dtype is None:
        raise UserError(f"--dtype '{cfg.dtype}' is not one of auto, float32, bfloat16")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if rank == 0 and not cfg.predict:  # --predict reads a run's out_dir and writes nothing there
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / 'config.json').write_text(json.dumps(asdict(cfg), indent=2))
    return Run(device=device, rank=rank, world_size=world, dtype=dtype, fsdp=cfg.fsdp and world > 1)


def seed_rank(cfg, run):
    """Per-rank randomness from here on (MLM masks, negative sampling differ across ranks)."""
    torch.manual_seed(cfg.seed + 1 + run.rank)
    random.seed(cfg.seed + 1 + run.rank)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather on dim 0; backward sums the gradient over ranks and returns this rank's shard."""

    @staticmethod
    def forward(ctx, x):  # (B, ...) -> (world*B, ...); every rank has the same B (drop_last=True)
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards)

    @staticmethod
    def backward(ctx, grad):  # every rank's loss depends on every shard: sum, then keep ours
        grad = grad.contiguous().clone()  # all_reduce is in place; the incoming grad is not ours
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def all_gather(x):
    """Concatenate x (B, ...) of every rank -> (world*B, ...) with gradients: backward sums them
    into the owner's shard, so under DDP averaging params get the exact global-batch gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def wrap_ddp(module, run):
    """DDP-wrap a trainable module. Frozen params (towers, momentum teachers) are not synced, nor
    buffers each step (no BatchNorm; every rank enqueues the same gathered features in queues).
    With run.fsdp: shard(module) instead, before the optimizer is built (the parameters are new)."""
    if run.fsdp or not run.distributed:
        return shard(module, run) if run.fsdp else module
    renamed = 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = 'forward_sync_buffers' if renamed else 'broadcast_buffers'  # torch 2.15
    device_ids = [run.device.index] if run.device.type == 'cuda' else None
    return DistributedDataParallel(module, device_ids=device_ids, **{no_buffer_sync: False})


def shard(model, run):
    """FSDP2 in place, once (a later stage keeps the shards; FSDP2 reads requires_grad at every
    gather): a unit per block of every nn.ModuleList holding parameters (an LLM's decoder layers,
    a vision tower's; a list has no forward to hook), the root holds the rest. -> model"""
    module, mesh = unwrap(model), dist.init_device_mesh(run.device.type, (run.world_size,))
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
    blocks = [b for m in reversed(lists) for b in m if any(True for _ in b.parameters())]
    for unit in [] if isinstance(module, FSDPModule) else [*blocks, module]:  # inner ones first
        fully_shard(unit, mesh=mesh)  # on the run's device (CUDA may be there and unused)
    return model


@contextmanager
def unsharded(model):
    """Under FSDP every rank gathers the whole model for the block, in which rank 0 alone may run
    forwards (evaluation; none is collective then); after it every rank shards it again and FSDP
    forgets rank 0's forwards (they would steer its next backward's prefetches alone)."""
    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]  # the root first
    for unit in units:  # every rank, in the same order
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    yield
    for unit in units:  # FSDP's defaults: blocks reshard after forward, the root does not
        unit.set_reshard_after_forward(unit is not units[0], recurse=False)
    for root in units[:1]:
        root.reset_iter_state()  # every unit resharded, the block's forwards forgotten


def teardown(run):
    """End a torchrun run's process group (drop DDP wrappers first: a reducer left can abort)."""
    if run.distributed and dist.is_initialized():
        dist.barrier()  # no rank may tear down while another still talks to it
        dist.destroy_process_group()


def unwrap(module):
    """The module under DDP / torch.compile wrappers (no 'module.' / '_orig_mod.' in ckpt keys)."""
    while hasattr(module, 'module') or hasattr(module, '_orig_mod'):
        module = getattr(module, 'module', None) or module._orig_mod
    return module


def to_device(batch, device):
    """A collated batch (dict) with its tensors on device; others (captions, counts) as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}

# ----------------------------------------------------------------------------- optimisation

def lr_at(step, cfg):
    """Linear warm-up to cfg.lr over warmup_steps, then cosine to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(module, weight_decay, exclude=(), **group_options):
    """Two AdamW groups of a module's trainable parameters but `exclude`: matrices decay, 1-D
    params (biases, norms, temperature) do not. Extra options (e.g. lr_scale=10) go in both."""
    params = [p for p in module.parameters() if p.requires_grad and id(p) not in map(id, exclude)]
    decay, no_decay = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    return [dict(params=decay, weight_decay=weight_decay, **group_options),
            dict(params=no_decay, weight_decay=0.0, **group_options)]


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)

# ----------------------------------------------------------------------------- checkpoints

def _rng_state():
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    random.setstate((state['python'][0], tuple(state['python'][1]), state['python'][2]))
    kind, key, *rest = state['numpy']
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))


def _rekey(optim_state, module, optimizer):
    """Optimizer state keyed by parameter index (torch's) <-> by name (FSDP's checkpoint API)."""
    names = {p: n for n, p in module.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group['params']]
    key = {**dict(enumerate(order)), **{n: i for i, n in enumerate(order)}}  # index <-> name
    groups = [dict(g, params=[key[k] for k in g['params']]) for g in optim_state['param_groups']]
    return dict(state={key[k]: v for k, v in optim_state['state'].items()}, param_groups=groups)


def save_checkpoint(path, method, model, optimizer, step, cfg, **extra):
    """Model, optimizer, step, RNG states and config, written atomically (temp file + rename): a
    crash mid-write never leaves a broken ckpt.pt. Rank 0 writes; under FSDP every rank must call
    it (each sends its shards: rank 0 gets whole tensors in CPU memory, the file of one process)."""
    module, rank = unwrap(model), dist.get_rank() if dist.is_initialized() else 0
    if isinstance(module, FSDPModule):  # (the other ranks get empty dicts)
        full = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = dcp.get_model_state_dict(module, options=full)
        optim = dcp.get_optimizer_state_dict(module, optimizer, options=full)
        optim = _rekey(optim, module, optimizer) if optim else optim
    elif rank == 0:  # DDP: the other ranks hold the same weights, nothing to gather
        weights, optim = module.state_dict(), optimizer.state_dict()
    if rank > 0:
        return
    state = dict(method=method, model=weights, optimizer=optim,
                 step=step, config=asdict(cfg), rng=_rng_state(), **extra)
    tmp = Path(path).with_suffix('.tmp')
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, method, map_location='cpu'):
    """Load a checkpoint with weights_only=True, checking that `method` wrote it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first (without --eval_only / --resume) "
                        f"or point --init_from at a ckpt.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise UserError(f"{path} is not a readable nanoalign checkpoint "
                        f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get('method') != method:
        found = (state if isinstance(state, dict) else {}).get('method', 'an unknown program')
        raise UserError(f"{path} was written by {found}, not {method}; point --init_from / "
                        f"--out_dir at a checkpoint of {method}")
    return state


def restore(state, model, optimizer=None, path='the checkpoint', flags='the sizes or backbones'):
    """Put a checkpoint back: weights, and for --resume the optimizer and RNG streams -> its step.
    A checkpoint of another shape is a UserError naming the file and the flags that set shapes."""
    module, full = unwrap(model), dcp.StateDictOptions(full_state_dict=True)
    try:
        if isinstance(module, FSDPModule):  # every rank cuts its shards out of the whole tensors
            dcp.set_model_state_dict(module, state['model'], options=full)
            if optimizer is not None:
                optim = _rekey(state['optimizer'], module, optimizer)
                dcp.set_optimizer_state_dict(module, optimizer, optim, options=full)
        else:
            module.load_state_dict(state['model'])
            if optimizer is not None:
                optimizer.load_state_dict(state['optimizer'])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this model; were {flags} different? "
                        f"({str(e).splitlines()[0][:200]})") from None
    if optimizer is not None:
        set_rng_state(state['rng'])
    return state['step']


def load_into(path, method, model, optimizer=None, flags='the sizes or backbones'):
    """load_checkpoint + restore -> the checkpoint (extra entries, e.g. a stage, stay readable)."""
    state = load_checkpoint(path, method)
    restore(state, model, optimizer, path, flags)
    return state


def check_split(cfg, method):
    """--eval_only / --resume on one --ann_file split by image path must keep the checkpoint's
    split, or evaluation would see training images."""
    path = Path(cfg.init_from or Path(cfg.out_dir) / 'ckpt.pt')
    saved = load_checkpoint(path, method)['config'] if path.is_file() else {}
    if tuple(saved.get('split_ratio', cfg.split_ratio)) != tuple(cfg.split_ratio):
        ratio = ','.join(map(str, saved['split_ratio']))
        raise UserError(f"{path} was trained at --split_ratio {ratio}; another split would put its "
                        f"training images in val / test: pass --split_ratio {ratio}")


def check_finite(loss, step, cfg):
    """A NaN / inf loss stops the run; the last good checkpoint stays as it was."""
    if not torch.isfinite(loss):
        ckpt = Path(cfg.out_dir) / 'ckpt.pt'
        kept = (f"the last good checkpoint is {ckpt}" if ckpt.exists()
                else "no checkpoint was written yet")
        raise UserError(f"loss is {loss.item()} at step {step}; stopped, {kept}. "
                        f"Try a lower --lr or --dtype float32")

# ----------------------------------------------------------------------------- two-stage methods

def stage_ranges(cfg):
    """--stage 1 | 2 | both -> [(stage, first, last)]: each stage's global steps [first, last),
    empty if not run: stage 1 runs --stage1_steps (at --stage1_lr), stage 2 --max_steps (--lr)."""
    stage1 = cfg.stage1_steps if cfg.stage != '2' else 0
    stage2 = cfg.max_steps if cfg.stage != '1' else 0
    return [(1, 0, stage1), (2, stage1, stage1 + stage2)]


def stage_schedule(cfg, stage, first, last):
    """The config whose lr_at(step - first, ...) is this stage's schedule (its peak lr, length)."""
    return dataclasses.replace(cfg, lr=cfg.stage1_lr if stage == 1 else cfg.lr,
                               max_steps=last - first)


def resume_stage(state, stage, first, start, model, optimizer, path, flags):
    """--resume into a stage: a checkpoint of it restores optimizer + RNG; one from the end of the
    stage before (start == first) only the RNG (weights are loaded): draws match an unbroken run."""
    if state is not None and state['stage'] == stage:
        restore(state, model, optimizer, path, flags)
    elif state is not None and start == first:
        set_rng_state(state['rng'])

# ----------------------------------------------------------------------------- logging & speed

def peak_memory_mb(device):
    """Peak CUDA memory allocated; on CPU the process's peak resident memory."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss: KiB on Linux


PEAK_BF16_FLOPS = [  # dense bf16 FLOP/s from data sheets, by device name: specific names first
    ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('H200', 989e12),
    ('GH200', 989e12), ('B200', 2250e12), ('A100', 312e12), ('A800', 312e12), ('L40S', 362e12),
    ('L40', 181e12), ('A10G', 70e12), ('A10', 125e12), ('L4', 121e12), ('RTX 4090', 165e12),
    ('RTX 3090', 71e12), ('A6000', 155e12), ('V100', 125e12), ('T4', 65e12)]


def peak_flops(device):
    """The device's peak bf16 FLOP/s by name, or None (CPU, or a GPU not in the table: no MFU)."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


class Logger:
    """tqdm bar with the running loss, a log.jsonl line per logged step; rank 0 only. Training time
    is step() to step() less `with logger.paused():` blocks; mfu on CUDA needs flops_per_sample."""

    def __init__(self, cfg, run, start_step=0):
        self.cfg, self.run = cfg, run
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * run.world_size
        self.bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not run.is_main,
                        dynamic_ncols=True)
        mode = 'a' if cfg.resume else 'w'
        self.file = open(Path(cfg.out_dir) / 'log.jsonl', mode) if run.is_main else None
        self.last_time, self.last_step, self.steps_done = time.perf_counter(), start_step, 0
        self.train_seconds, self.flops_per_sample, self.flops_done = 0.0, None, 0.0

    def step(self, step, losses, lr):
        """Call after optimizer step `step` (0-based) with the losses as floats."""
        steps = step + 1 - self.last_step
        self.train_seconds += time.perf_counter() - self.last_time
        self.steps_done += steps
        self.flops_done += (self.flops_per_sample or 0.0) * self.samples_per_step * steps
        self.bar.update(steps)
        self.bar.set_postfix(loss=f"{losses.get('loss', 0.0):.4f}")
        if self.file and ((step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.max_steps):
            rate = self.samples_per_step * self.steps_done / max(self.train_seconds, 1e-9)
            rounded = {k: round(v, 6) for k, v in losses.items()}
            self.log(dict(step=step + 1, lr=lr, samples_per_s=round(rate, 2), **rounded))
        self.last_time, self.last_step = time.perf_counter(), step + 1

    def log(self, row):
        """A free-form line (e.g. validation metrics) in log.jsonl."""
        if self.file:
            self.file.write(json.dumps(row) + '\n')
            self.file.flush()

    @contextmanager
    def paused(self):
        """What runs inside is not training time (evaluation, checkpointing)."""
        self.train_seconds += time.perf_counter() - self.last_time
        try:
            yield
        finally:
            self.last_time = time.perf_counter()

    def speed(self):
        """metrics.json speed keys: samples/s, seconds, peak memory, mfu (known GPU, flops set)."""
        rate = self.samples_per_step * self.steps_done / max(self.train_seconds, 1e-9)
        out = dict(train_samples_per_s=round(rate, 2), train_seconds=round(self.train_seconds, 2),
                   peak_mem_mb=round(peak_memory_mb(self.run.device), 1))
        peak = peak_flops(self.run.device)
        if self.flops_done and peak:
            achieved = self.flops_done / max(self.train_seconds, 1e-9)
            out['mfu'] = round(100 * achieved / (peak * self.run.world_size), 2)
        return out

    def close(self):
        self.bar.close()
        if self.file:
            self.file.close()


def count_flops(loss_of_one_batch, model, samples, run):
    """Model FLOPs per sample of one training step by FlopCounterMode, for MFU: CUDA only (else
    None), once per stage before its loop. loss_of_one_batch() is the forward (under the run's
    autocast, as in training); its backward is counted too. The step's effects (weights, buffers
    such as queues, gradients, RNG streams) are undone: training goes on as if uncounted."""
    if run.device.type != 'cuda':
        return None
    module = unwrap(model)
    saved = {k: v.detach().clone() if isinstance(v, DTensor) else v.detach().to('cpu', copy=True)
             for k, v in module.state_dict().items()}  # FSDP's shards (DTensor) stay where they are
    rng = _rng_state()
    with FlopCounterMode(display=False) as counter:
        with run.autocast():
            loss = loss_of_one_batch()
        loss.backward()
    module.load_state_dict(saved)
    module.zero_grad(set_to_none=True)
    set_rng_state(rng)
    return counter.get_total_flops() / samples


def write_metrics(cfg, metrics):
    """metrics.json: one flat object of numbers (NaN as null), and a few words (ptb_tokenizer)."""
    metrics = {k: v if isinstance(v, str) else round(float(v), 4) if v == v else None
               for k, v in metrics.items()}
    (Path(cfg.out_dir) / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics

# ----------------------------------------------------------------------------- metrics
# Metrics are on the papers' scale (percent, CIDEr x100), so metrics.json reads like their tables.


def retrieval_metrics(sims, image_texts, texts=None, sims_t2i=None):
    """Recall@{1,5,10} image->text (tr), text->image (ir) in percent, and their mean (rmean). sims
    (I, T); sims_t2i (T, I) if not sims.T (re-ranking scores each direction's top-k alone); image
    i's captions are image_texts[i]; with texts (their strings) equal texts are interchangeable."""
    sims = torch.as_tensor(sims).float()  # (I, T)
    if sims.isnan().any():
        raise ValueError('retrieval_metrics: sims contains NaN')
    n_img, n_txt = sims.shape
    if texts is not None and len(texts) != n_txt:
        raise ValueError(f'retrieval_metrics: {len(texts)} texts for {n_txt} columns of sims')
    # equal texts are one (ShapesWorld images can share a description: no model breaks such ties)
    ids_of = {}  # distinct string -> its id
    text_id = torch.tensor([ids_of.setdefault(t, len(ids_of))
                            for t in (range(n_txt) if texts is None else texts)])  # (T,)
    has_text = torch.zeros(n_img, len(ids_of), dtype=torch.bool)  # (I, distinct texts)
    for i, ids in enumerate(image_texts):
        has_text[i, text_id[ids]] = True
    correct = has_text[:, text_id].to(sims.device)  # (I, T)
    for name, rows in (('image', correct.any(1)), ('text', correct.any(0))):
        if not rows.all():
            raise ValueError(f'retrieval_metrics: {name} {int((~rows).nonzero()[0])} has no '
                             f'correct match in image_texts')

    def recalls(scores, ok):  # scores, ok: (queries, candidates)
        best = scores.masked_fill(~ok, -math.inf).amax(1, keepdim=True)  # (Q, 1) best correct score
        # wrong candidates scoring at least as high: ties count against the model (equal scores
        # everywhere give chance-level recall, not 100)
        rank = ((scores >= best) & ~ok).sum(1)  # (Q,)
        return [100.0 * (rank < k).float().mean().item() for k in (1, 5, 10)]
    sims_t2i = sims.T if sims_t2i is None else torch.as_tensor(sims_t2i).float().to(sims.device)
    values = recalls(sims, correct) + recalls(sims_t2i, correct.T)  # image->text, text->image
    return dict(zip(('tr1', 'tr5', 'tr10', 'ir1', 'ir5', 'ir10'), values), rmean=sum(values) / 6)


def ptb_like(sentence):
    """Pure-Python stand-in for the Stanford PTBTokenizer as pycocoevalcap runs it (-lowerCase, then
    PUNCTUATIONS dropped), exact on ordinary captions: lowercased, contractions and punctuation
    split off, quotes dropped, brackets as -lrb- -rrb- ... (Java lowercases them past PUNCTUATIONS).
    Rarer cases differ (e.g. "mr." keeps its dot in Java, "gonna")."""
    s = ' ' + sentence.lower() + ' '
    s = re.sub(r'[()\[\]{}]', lambda m: ' -%s- ' % {'(': 'lrb', ')': 'rrb', '[': 'lsb', ']': 'rsb',
                                                      '{': 'lcb', '}': 'rcb'}[m.group()], s)
    s = re.sub(r'["`]|(?<![a-z0-9])\'|\'(?![a-z0-9])', ' ', s)  # quotes go, in-word ' stays
    s = re.sub(r'(\.\.\.|--|[;!?$%&])', r' \1 ', s)
    s = re.sub(r'(?<!\d)([,:])|([,:])(?!\d)', r' \1\2 ', s)   # 1,000 and 5:30 stay whole
    s = re.sub(r"n't\b", " n't", s)                           # isn't -> is n't
    s = re.sub(r"'(s|re|ve|ll|d|m)\b", r" '\1", s)            # dog's -> dog 's
    tokens = []
    for tok in s.split():
        if tok.endswith('.') and tok not in ('.', '...') and not re.fullmatch(r'([a-z]\.)+', tok):
            tokens += [tok[:-1], '.']                           # sentence-final dot (not 3.5, u.s.)
        else:
            tokens.append(tok)
    return ' '.join(t for t in tokens if t not in PUNCTUATIONS)


def ptb_tokenize(captions):
    """{key: [sentence, ...]} -> same with PTB-tokenised sentences: Java when present (the papers'
    exact tokenisation), else ptb_like. One JVM start for the whole dict."""
    if shutil.which('java'):  # a newline would shift PTBTokenizer's one-line-per-caption output
        rows = {k: [{'caption': ' '.join(c.split())} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(rows)
    return {k: [ptb_like(c) for c in v] for k, v in captions.items()}


def spice_ready():
    # Spice() downloads Stanford CoreNLP (~400 MB) when its jars are missing: only run it with them.
    jar = os.path.join(spice_models.SPICEDIR, spice_models.SPICELIB, spice_models.JAR)
    jars = all(os.path.exists(jar + end) for end in ('.jar', '-models.jar'))
    return bool(shutil.which('java')) and jars


def caption_metrics(predictions, references):
    """COCO caption metrics x100: bleu4 meteor rouge_l cider (+ spice if its CoreNLP jars are
    there), and ptb_tokenizer: 'java' or 'python'. predictions: {id: caption}; references: {id:
    [raw caption, ...]}, scored as COCO does (PTB-tokenised, never truncated). Scorers run one by
    one (COCOEvalCap.evaluate would download CoreNLP for SPICE). Without Java: no meteor key."""
    if missing := set(predictions) ^ set(references):
        raise ValueError(f'caption_metrics: ids {sorted(missing, key=str)[:5]} are in only one of '
                         f'predictions / references')
    if not all(references.values()):
        raise ValueError('caption_metrics: every id needs at least one reference caption')
    tokens = ptb_tokenize({**{('res', k): [v] for k, v in predictions.items()},
                        **{('gts', k): v for k, v in references.items()}})
    res = {k: tokens[('res', k)] for k in predictions}  # {id: [tokenised prediction]}
    gts = {k: tokens[('gts', k)] for k in predictions}  # {id: [tokenised references]}
    out = {'bleu4': 100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3],
           'rouge_l': 100 * Rouge().compute_score(gts, res)[0],
           'cider': 100 * Cider().compute_score(gts, res)[0]}
    if shutil.which('java'):
        out['meteor'] = 100 * Meteor().compute_score(gts, res)[0]
    else:
        warnings.warn('caption_metrics: `java` is not on PATH, so METEOR is left out and PTB '
                      'tokenisation uses a pure-Python approximation; install a Java runtime '
                      'for the papers\' exact numbers')
    if spice_ready():
        out['spice'] = 100 * Spice().compute_score(gts, res)[0]
    out['ptb_tokenizer'] = 'java' if shutil.which('java') else 'python'
    return out


def auroc(scores, labels):
    """Area under the ROC curve x100: P(random positive outscores random negative), ties count half
    (Mann-Whitney U from average ranks). NaN, with a warning, when labels hold a single class."""
    s = torch.as_tensor(scores).detach().double().cpu().flatten().numpy()
    y = torch.as_tensor(labels).detach().cpu().flatten().numpy()
    if len(s) != len(y) or np.isnan(s).any() or not np.isin(y, (0, 1)).all():
        raise ValueError(f'auroc: need one 0/1 label per score and no NaN score '
                         f'(got {len(s)} scores, labels {np.unique(y)[:5]})')
    y = y.astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f'auroc: all {len(y)} labels are {"positive" if n_neg == 0 else "negative"}, '
                      f'AUROC is undefined (NaN)')
        return float('nan')
    order = np.argsort(s, kind='stable')
    _, first, count = np.unique(s[order], return_index=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = np.repeat(first + (count + 1) / 2, count)  # 1-based; ties share their mean rank
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2  # pairs (pos, neg) with pos ranked higher
    return 100.0 * u / (n_pos * n_neg)


# ----------------------------------------------------------------------------- token pictures

SHADE = (31, 119, 180)  # value 1 (value 0 is white)
MARK = (214, 39, 40)    # outline of marked tokens
PAD, PANEL_W, IMAGE_MIN, IMAGE_MAX = 12, 560, 192, 384  # picture layout in pixels


def _shade(v):
    v = min(max(float(v), 0.0), 1.0)
    return tuple(round(255 + v * (c - 255)) for c in SHADE)


def render_tokens(image, rows, path, title=None, mark_label='marked'):
    """PNG of the image beside rows of tokens shaded white -> blue by value, plus a legend. image:
    PIL, or (3, H, W) normalised by CLIP_MEAN / CLIP_STD. rows: [(label, [(token, value, marked),
    ...]), ...]; values clipped to [0, 1]; marked: red outline. Returns path."""
    if isinstance(image, torch.Tensor):
        std, mean = torch.tensor(CLIP_STD).view(3, 1, 1), torch.tensor(CLIP_MEAN).view(3, 1, 1)
        x = image.detach().float().cpu() * std + mean  # (3, H, W)
        image = Image.fromarray((x.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())
    image = image.convert('RGB')
    if max(image.size) < IMAGE_MIN:  # ShapesWorld's 64 px
        f = math.ceil(IMAGE_MIN / max(image.size))  # a whole factor: nearest keeps pixels crisp
        image = image.resize((image.width * f, image.height * f), Image.NEAREST)
    elif max(image.size) > IMAGE_MAX:
        image.thumbnail((IMAGE_MAX, IMAGE_MAX), Image.BICUBIC)
    font, line_h, gap = ImageFont.load_default(size=14), 22, 4
    x0 = 2 * PAD + image.width        # left edge of the text panel
    top = y = PAD + (line_h + PAD if title else 0)  # lay out first (for the height), then draw
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
        draw.rectangle((x, y, x + font.getlength(text) + 8, y + line_h), fill=_shade(value),
                       outline=MARK if marked else (200, 200, 200), width=2 if marked else 1)
        draw.text((x + 4, y + 3), text, fill='white' if value > 0.6 else 'black', font=font)
    draw.text((x0, legend_y + 3), '0', fill='black', font=font)  # legend: 0 -> 1 ramp, red outline
    for x in range(x0 + 14, x0 + 174):
        draw.line((x, legend_y + 4, x, legend_y + line_h - 4), fill=_shade((x - x0 - 14) / 159))
    draw.text((x0 + 180, legend_y + 3), '1', fill='black', font=font)
    draw.rectangle((x0 + 210, legend_y, x0 + 230, legend_y + line_h), outline=MARK, width=2)
    draw.text((x0 + 238, legend_y + 3), mark_label, fill='black', font=font)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    canvas.save(path)
    return path
