"""
test_all.py — every nanoalign test: CPU only, offline, tiny configs, minutes on 2 cores.

    python -m pytest -q test_all.py
"""
import os

os.environ['NANOALIGN_OFFLINE'] = '1'  # never reach for the network in a test (set before
os.environ['HF_HUB_OFFLINE'] = '1'     # huggingface_hub is imported: it reads this once)

import json
import math
import random
import re
import shutil
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from transformers import (BertConfig, BertForMaskedLM, BertLMHeadModel, BertModel, CLIPVisionConfig, CLIPVisionModel,
                          DeiTConfig, DeiTModel, ViTConfig, ViTModel)

REPO = Path(__file__).resolve().parent

import backbones
import common
import data
from backbones import (Attention, BertLayer, VisionTransformer, bert_from_hf, causal_mask, interpolate_pos_embed,
                       padding_mask, vit_from_hf)
from common import (PAD, PANEL_W, RunConfig, auroc, caption_metrics, parse_config, ptb_like, ptb_tokenize,
                    render_tokens, retrieval_metrics, spice_ready)
from data import CLIP_MEAN, CLIP_STD, UserError

# ============================================================================= shared fixtures and helpers

@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv('NANOALIGN_OFFLINE', '1')


@pytest.fixture(scope='module')
def tokenizer():
    return backbones.build_tokenizer()


@pytest.fixture(scope='module')
def builtin_backbones(tmp_path_factory):
    """The three shapes-tiny backbones, pretrained for a few steps only, in a temporary backbone folder."""
    folder = tmp_path_factory.mktemp('backbones')
    for name in backbones.BUILTIN_BACKBONES:
        backbones.builtin_backbone(name, cache_dir=folder, steps=3)
    return folder


@pytest.fixture
def one_thread():
    """Runs compared bit for bit within one process use one thread. With two, two identical albef_epic
    runs in a row differ by ~1e-4 after 4 steps: MKL's multi-threaded sgemm is not repeatable from one
    call to the next (MKL_CBWR=COMPATIBLE makes `--epic none` exact on two threads, not EPIC's step);
    on one thread every run is exact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_backbones(builtin_backbones, monkeypatch, tmp_path_factory):
    """Method runs load their shapes-tiny backbones from the few-step fixture folder, and score captions without
    Java (METEOR's JVM takes seconds per call; the metrics themselves are tested with and without Java above)."""
    monkeypatch.setattr(backbones, 'BACKBONE_DIR', builtin_backbones)
    monkeypatch.setenv('PATH', str(tmp_path_factory.mktemp('no_java')))
    return builtin_backbones


def read_log(out):
    return [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]


def interrupted_then_resumed(main, argv, out, stop_at, monkeypatch):
    """Run main(argv) until the checkpoint of step `stop_at` is written, die there, then run it again with
    --resume true: the resumed run must end where an uninterrupted one does."""
    class Died(Exception):
        pass

    save = common.save_checkpoint

    def save_then_die(path, method, model, optimizer, step, cfg, **extra):
        save(path, method, model, optimizer, step, cfg, **extra)
        if step == stop_at:
            raise Died

    monkeypatch.setattr(common, 'save_checkpoint', save_then_die)
    with pytest.raises(Died):
        main(argv + ['--out_dir', str(out)])
    monkeypatch.setattr(common, 'save_checkpoint', save)
    main(argv + ['--out_dir', str(out), '--resume', 'true'])
    return torch.load(Path(out) / 'ckpt.pt', weights_only=True)


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=lambda m: f'{k}: {m}')


def word_diff(a, b):
    a, b = a.split(), b.split()
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def rng_at_each_call(module, name, monkeypatch, run):
    """The torch RNG state at every call of module.name while run() runs: what each training step draws from."""
    states, function = [], getattr(module, name)

    def recorded(*args, **kwargs):
        states.append(torch.get_rng_state())
        return function(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    run()
    monkeypatch.setattr(module, name, function)
    return states


def predicted_blocks(out, images):
    """--predict's printout -> {image path: the indented lines under it}, one block per image, in order."""
    lines = out.splitlines()
    starts = [lines.index(str(path)) for path in images]
    assert starts == sorted(starts), out
    blocks = {str(path): lines[s + 1:e] for path, s, e in zip(images, starts, starts[1:] + [len(lines)])}
    assert all(line.startswith('  ') for block in blocks.values() for line in block), out
    return blocks

# ============================================================================= common.py

@dataclass
class ToyConfig(RunConfig):
    hidden: int = 16            # a method field
    dims: tuple = (4, 8)        # a tuple field
    use_queue: bool = True


TOY_PRESETS = {'shapes': dict(max_steps=50), 'coco': dict(max_steps=9000, hidden=768)}


def test_cli_flags_override_the_data_preset():
    cfg = parse_config(ToyConfig, TOY_PRESETS, ['--data', 'coco', '--hidden=32', '--use_queue', 'false',
                                                 '--dims', '2,4,8'], stem='toy')
    assert (cfg.max_steps, cfg.hidden, cfg.use_queue, cfg.dims) == (9000, 32, False, (2, 4, 8))
    assert cfg.out_dir == str(Path('out') / 'toy')
    assert parse_config(ToyConfig, TOY_PRESETS, [], stem='toy').max_steps == 50


@pytest.mark.parametrize('argv, message', [
    (['--max_step', '3'], 'did you mean --max_steps'),
    (['--use_queue', 'yes'], 'takes true or false'),
    (['--hidden', 'big'], 'takes a int'),
    (['--data', 'imagenet'], "unknown --data 'imagenet'"),
    (['--lr'], 'needs a value'),
])
def test_cli_mistakes_get_one_clear_message(argv, message):
    with pytest.raises(UserError, match=message):
        parse_config(ToyConfig, TOY_PRESETS, argv, stem='toy')


def test_main_guard_prints_the_message_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        common.main_guard(lambda: parse_config(ToyConfig, TOY_PRESETS, ['--bogus', '1']))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: unknown flag --bogus') and 'Traceback' not in err


def test_lr_warms_up_linearly_then_follows_the_cosine_to_the_floor():
    cfg = RunConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert common.lr_at(0, cfg) == pytest.approx(0.1)
    assert common.lr_at(9, cfg) == pytest.approx(1.0)
    assert common.lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)   # half-way through the cosine
    assert common.lr_at(110, cfg) == pytest.approx(0.1)


def test_param_groups_exempt_biases_and_norms_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    decay, no_decay = common.param_groups(model, 0.05, lr_scale=2.0)
    assert [p.shape for p in decay['params']] == [(4, 4)] and decay['weight_decay'] == 0.05
    assert len(no_decay['params']) == 2 and no_decay['weight_decay'] == 0.0  # linear bias + LN bias
    opt = torch.optim.AdamW([decay, no_decay], lr=1.0)
    common.set_lr(opt, 0.5)
    assert [g['lr'] for g in opt.param_groups] == [1.0, 1.0]


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'toy.py', model, opt, step=7, cfg=cfg)
    assert not (tmp_path / 'ckpt.tmp').exists()     # written through a temp file, then renamed
    expected_draw = torch.rand(3)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    state = common.load_checkpoint(tmp_path / 'ckpt.pt', 'toy.py')
    assert common.restore(state, model2, opt2) == 7
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    assert torch.equal(model2.weight, model.weight)
    assert opt2.state_dict()['state'][0]['step'] == 1


def test_checkpoint_keys_have_no_wrapper_prefixes(tmp_path):
    model = torch.nn.Linear(2, 2)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model        # what torch.compile puts around a module
    assert common.unwrap(wrapped) is model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'toy.py', wrapped, opt, 0, RunConfig())
    assert set(torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']) == {'weight', 'bias'}


def test_checkpoint_mistakes_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(UserError, match='no checkpoint at .*missing.pt'):
        common.load_checkpoint(tmp_path / 'missing.pt', 'toy.py')
    model = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'other.py', model, torch.optim.SGD(model.parameters(), lr=1),
                           0, RunConfig())
    with pytest.raises(UserError, match='written by other.py, not toy.py'):
        common.load_checkpoint(tmp_path / 'ckpt.pt', 'toy.py')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='not a readable nanoalign checkpoint'):
        common.load_checkpoint(tmp_path / 'junk.pt', 'toy.py')


def test_nan_loss_stops_the_run_and_points_at_the_last_good_checkpoint(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    common.check_finite(torch.tensor(1.0), 3, cfg)
    (tmp_path / 'ckpt.pt').write_bytes(b'')
    with pytest.raises(UserError, match=r'loss is nan at step 5; stopped, the last good checkpoint is'):
        common.check_finite(torch.tensor(float('nan')), 5, cfg)


def test_logger_writes_one_json_line_per_logged_step(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path), max_steps=4, log_every=2, batch_size=8)
    run = common.Run(device=torch.device('cpu'))
    logger = common.Logger(cfg, run)
    for step in range(4):
        logger.step(step, dict(loss=1.0 / (step + 1)), lr=0.1)
    speed = logger.speed()
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows] == [2, 4] and rows[1]['loss'] == 0.25
    assert rows[0]['samples_per_s'] > 0 and speed['train_samples_per_s'] > 0 and speed['peak_mem_mb'] > 0


def test_peak_flops_are_looked_up_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'NVIDIA H100 PCIe')
    assert common.peak_flops(torch.device('cuda', 0)) == 756e12
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'NVIDIA H100 80GB HBM3')
    assert common.peak_flops(torch.device('cuda', 0)) == 989e12
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda d=None: 'Some Future GPU')
    assert common.peak_flops(torch.device('cuda', 0)) is None
    assert common.peak_flops(torch.device('cpu')) is None


def test_count_flops_counts_one_step_on_cuda_only_and_undoes_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    model.register_buffer('queue', torch.zeros(2))
    x, before = torch.randn(5, 4), {k: v.clone() for k, v in model.state_dict().items()}
    rng, python_rng = torch.get_rng_state(), random.getstate()

    def step():  # a forward with every side effect a method's step may have; count_flops adds backward
        with torch.no_grad():
            model.queue += 1
            model[0].weight += 1
        random.random()
        return model(x).sum()

    cuda = SimpleNamespace(device=torch.device('cuda'), autocast=nullcontext)  # what it reads
    # 5 samples: forward 2*4*3 multiply-adds each, backward the weight's gradient (x needs none)
    assert common.count_flops(step, model, 5, cuda) == 2 * 4 * 3 + 2 * 4 * 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].weight.grad is None
    assert torch.equal(rng, torch.get_rng_state()) and python_rng == random.getstate()
    assert common.count_flops(step, model, 5, SimpleNamespace(device=torch.device('cpu'))) is None


DDP_SCRIPT = '''
import sys, torch, torch.nn.functional as F
sys.path.insert(0, {repo!r})
import common
cfg = common.RunConfig(device='cpu', out_dir={out!r})
run = common.setup(cfg)                        # gloo process group under torchrun
model = torch.nn.Linear(8, 4)                  # same init on every rank (same seed)
ddp = common.wrap_ddp(model, run)
g = torch.Generator().manual_seed(1)
images, texts = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)   # the global batch
mine = slice(4 * run.rank, 4 * run.rank + 4)
feats = ddp(torch.cat([images[mine], texts[mine]]))
img, txt = (F.normalize(common.all_gather(f), dim=-1) for f in feats.split(4))  # (8, 4) each
logits = img @ txt.T / 0.07
loss = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
loss.backward()                                # DDP averages the parameter gradients over ranks
if run.is_main:
    torch.save([p.grad for p in model.parameters()], {out!r} + '/grads.pt')
del ddp, feats, loss                           # DDP's reducer goes before the process group,
common.teardown(run)                           # which goes before exit (else gloo threads can abort a rank)
'''


def test_gathered_contrastive_loss_on_two_ranks_matches_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    img, txt = F.normalize(model(images), dim=-1), F.normalize(model(texts), dim=-1)
    logits = img @ txt.T / 0.07
    ((F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2).backward()
    for ddp_grad, p in zip(torch.load(tmp_path / 'grads.pt'), model.parameters()):
        torch.testing.assert_close(ddp_grad, p.grad, atol=1e-6, rtol=1e-5)

# ----------------------------------------------------------------------------- metrics and pictures

needs_java = pytest.mark.skipif(shutil.which('java') is None, reason='java not on PATH')

# ----------------------------------------------------------------------------- retrieval

def test_retrieval_recall_matches_hand_ranks_on_3x6_toy():
    sims = torch.tensor([[0.90, 0.10, 0.80, 0.70, 0.60, 0.50],
                         [0.85, 0.95, 0.30, 0.20, 0.65, 0.55],
                         [0.05, 0.15, 0.25, 0.35, 0.45, 0.40]])
    image_texts = [[0, 1], [2, 3], [4, 5]]
    # image ranks of the best correct text: 0, 4 (0.85 0.95 0.65 0.55 above 0.30), 0
    # text ranks of the correct image: t0 0, t1 2, t2 1, t3 2, t4 2, t5 2
    m = retrieval_metrics(sims, image_texts)
    expected = dict(tr1=200 / 3, tr5=100, tr10=100, ir1=100 / 6, ir5=100, ir10=100)
    expected['rmean'] = sum(expected.values()) / 6
    assert m == pytest.approx(expected)


def test_retrieval_recall_at_5_and_10_split_at_rank_5():
    sims = torch.zeros(2, 12)
    sims[0] = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0] + [0.1] * 6)  # 5 wrong texts above text 0: rank 5
    sims[1, 11] = 2.0
    m = retrieval_metrics(sims, [[0], list(range(1, 12))])
    assert (m['tr1'], m['tr5'], m['tr10']) == pytest.approx((50, 50, 100))
    assert (m['ir1'], m['ir5'], m['ir10']) == pytest.approx((100 * 2 / 12, 100, 100))  # only t0 and t11 rank first


def test_retrieval_counts_identical_caption_text_as_correct_in_both_directions():
    texts = ['a red circle', 'a blue square', 'a red circle', 'a green cross']
    image_texts = [[0, 1], [2, 3]]  # both images have a caption 'a red circle'
    sims = torch.tensor([[0.1, 0.2, 0.9, 0.0],    # image 0 prefers text 2, image 1's copy of its own caption
                         [0.8, 0.1, 0.3, 0.2]])   # image 1 prefers text 0, image 0's copy
    by_index = retrieval_metrics(sims, image_texts)
    by_text = retrieval_metrics(sims, image_texts, texts)
    assert (by_index['tr1'], by_index['ir1']) == (0, 50)   # texts 0 and 2 rank the "wrong" image first
    assert (by_text['tr1'], by_text['ir1']) == (100, 100)


def test_retrieval_score_ties_count_against_the_model():
    m = retrieval_metrics(torch.ones(2, 4), [[0, 1], [2, 3]])
    assert (m['tr1'], m['tr5'], m['ir1']) == (0, 100, 0)


def test_retrieval_matches_a_per_query_loop_on_random_scores_with_duplicate_texts():
    g = torch.Generator().manual_seed(0)
    n_img, per = 30, 5
    texts = [f'caption {random.Random(t).randrange(40)}' for t in range(n_img * per)]  # many duplicates
    image_texts = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    sims = torch.randn(n_img, n_img * per, generator=g)
    correct = [[any(texts[t] == texts[c] for c in image_texts[i]) for t in range(len(texts))] for i in range(n_img)]

    def loop_recall(rows, ok, k):  # rank by sorting each query's candidates, first correct one counts
        hits = [next(r for r, c in enumerate(sorted(range(len(row)), key=lambda c: -row[c])) if ok[q][c]) < k
                for q, row in enumerate(rows)]
        return 100 * sum(hits) / len(hits)

    m = retrieval_metrics(sims, image_texts, texts)
    cols = list(zip(*correct))
    for k in (1, 5, 10):
        assert m[f'tr{k}'] == pytest.approx(loop_recall(sims.tolist(), correct, k))
        assert m[f'ir{k}'] == pytest.approx(loop_recall(sims.T.tolist(), cols, k))


def test_retrieval_runs_at_coco_test_size_and_random_scores_give_chance():
    sims = torch.randn(1000, 5000, generator=torch.Generator().manual_seed(0))
    m = retrieval_metrics(sims, [list(range(5 * i, 5 * i + 5)) for i in range(1000)])
    assert m['tr10'] < 10 and m['ir10'] < 3  # chance: ~5% (50 of 5000 texts), 1%


def test_retrieval_rejects_a_text_without_image():
    with pytest.raises(ValueError, match='text 2'):
        retrieval_metrics(torch.zeros(1, 3), [[0, 1]])

# ----------------------------------------------------------------------------- captioning

PRED = {1: 'A red circle above a blue square.',
        2: "There's a small green triangle, on the left.",
        3: 'Two dogs (brown) play in the snow!',
        4: 'a man riding a wave on top of a surfboard',
        5: 'The cat isn\'t on the "mat".'}
REFS = {1: ['A red circle is above a blue square.', 'a blue square below a red circle', 'Red circle; blue square.'],
        2: ['A small green triangle is on the left.', "There's a green triangle at the left side."],
        3: ['Two brown dogs playing in the snow.', 'Dogs (two of them) run through snow...', "The dogs' game in the snow."],
        4: ['A man on a surfboard riding a wave.', 'A surfer rides a big wave -- at 5:30, in 3.5 ft water!'],
        5: ["The cat's not on the mat.", 'A cat sits next to a "welcome" mat, in the U.S.']}
# what pycocoevalcap's Java PTBTokenizer makes of them (checked in test_java_ptb_tokenizer_gives_the_toy_tokens)
PRED_TOK = {1: ['a red circle above a blue square'],
            2: ["there 's a small green triangle on the left"],
            3: ['two dogs -lrb- brown -rrb- play in the snow'],
            4: ['a man riding a wave on top of a surfboard'],
            5: ["the cat is n't on the mat"]}
REFS_TOK = {1: ['a red circle is above a blue square', 'a blue square below a red circle', 'red circle blue square'],
            2: ['a small green triangle is on the left', "there 's a green triangle at the left side"],
            3: ['two brown dogs playing in the snow', 'dogs -lrb- two of them -rrb- run through snow',
                'the dogs game in the snow'],
            4: ['a man on a surfboard riding a wave', 'a surfer rides a big wave at 5:30 in 3.5 ft water'],
            5: ["the cat 's not on the mat", 'a cat sits next to a welcome mat in the u.s.']}


def reference_scores():
    return {'bleu4': 100 * Bleu(4).compute_score(REFS_TOK, PRED_TOK, verbose=0)[0][3],
            'rouge_l': 100 * Rouge().compute_score(REFS_TOK, PRED_TOK)[0],
            'cider': 100 * Cider().compute_score(REFS_TOK, PRED_TOK)[0]}


def test_python_ptb_approximation_gives_the_java_tokens_on_the_toy_set():
    assert {k: [ptb_like(v)] for k, v in PRED.items()} == PRED_TOK
    assert {k: [ptb_like(c) for c in v] for k, v in REFS.items()} == REFS_TOK


@needs_java
def test_java_ptb_tokenizer_gives_the_toy_tokens():
    tokens = ptb_tokenize({**{('res', k): [v] for k, v in PRED.items()}, **{('gts', k): v for k, v in REFS.items()}})
    assert {k: tokens[('res', k)] for k in PRED} == PRED_TOK
    assert {k: tokens[('gts', k)] for k in REFS} == REFS_TOK


@needs_java
def test_caption_metrics_equal_pycocoevalcap_scorers_with_java():
    m = caption_metrics(PRED, REFS)
    expected = reference_scores() | {'meteor': 100 * Meteor().compute_score(REFS_TOK, PRED_TOK)[0]}
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert 0 < m['bleu4'] < 100 and m['cider'] > 50  # the papers' scale, not fractions
    assert ('spice' in m) == bool(spice_ready()) and m['ptb_tokenizer'] == 'java'


def test_caption_metrics_without_java_equal_scorers_and_omit_meteor(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))  # an empty folder: no java, and any attempt to spawn it would fail
    with pytest.warns(UserWarning, match='java'):
        m = caption_metrics(PRED, REFS)
    assert set(m) == {'bleu4', 'rouge_l', 'cider', 'ptb_tokenizer'} and m.pop('ptb_tokenizer') == 'python'
    assert m == pytest.approx(reference_scores(), abs=1e-6)


def test_caption_metrics_reject_ids_missing_from_references():
    with pytest.raises(ValueError, match='only one of'):
        caption_metrics({1: 'a cat', 2: 'a dog'}, {1: ['a cat']})

# ----------------------------------------------------------------------------- AUROC

@pytest.mark.parametrize('scores, labels, expected', [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 100.0),   # every positive above every negative
    ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),     # reversed
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 50.0),    # all tied: each pair counts one half
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 75.0),   # 0.35 beats 0.1 not 0.4, 0.8 beats both: 3 of 4 pairs
    ([0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1], 87.5),    # 0.5 beats 0.2, ties 0.5 (1/2); 0.9 beats both: 3.5 of 4
])
def test_auroc_on_hand_cases(scores, labels, expected):
    assert auroc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(expected)


def test_auroc_equals_pairwise_count_on_random_scores_with_ties():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    assert auroc(s, y) == pytest.approx(100 * ((pos > neg).mean() + 0.5 * (pos == neg).mean()))


def test_auroc_is_nan_with_a_warning_when_one_class_is_missing():
    with pytest.warns(UserWarning, match='undefined'):
        assert math.isnan(auroc([0.1, 0.7], [1, 1]))


def test_auroc_rejects_labels_other_than_0_and_1():
    with pytest.raises(ValueError, match='0/1 label'):
        auroc([0.1, 0.7], [-1, 1])

# ----------------------------------------------------------------------------- token pictures

ROWS = [('consistency', [('a', 0.1, False), ('red', 0.9, True), ('circle', 0.5, False)]),
        ('saliency', [(f'token{i}', i / 40, i % 7 == 0) for i in range(40)])]  # long enough to wrap


def test_render_tokens_writes_png_with_the_small_image_upscaled_by_nearest(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = render_tokens(image, ROWS, str(tmp_path / 'tokens.png'))
    png = Image.open(path).convert('RGB')
    assert png.size[0] == 3 * PAD + 192 + PANEL_W and png.size[1] >= 192 + 2 * PAD
    assert png.getpixel((PAD, PAD)) == image.getpixel((0, 0))
    assert png.getpixel((PAD + 5, PAD + 191)) == image.getpixel((1, 63))  # x3 nearest: pixel 1 covers 3..5


def test_render_tokens_undoes_clip_normalisation_of_tensors(tmp_path):
    rgb = torch.tensor([1.0, 0.0, 0.5]).view(3, 1, 1).expand(3, 64, 64)
    x = (rgb - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    png = Image.open(render_tokens(x, ROWS, str(tmp_path / 't.png'), title='a title')).convert('RGB')
    assert png.getpixel((PAD + 100, png.size[1] // 2)) == (255, 0, 128)

# ============================================================================= data.py

# ----------------------------------------------------------------------------- ShapesWorld

def test_shapesworld_is_deterministic_and_independent_of_call_order():
    a, b = data.ShapesWorld(seed=3), data.ShapesWorld(seed=3)
    b.image('train', 99), b.captions('val', 5)  # other calls first must not matter
    for split, i in (('train', 12), ('val', 7), ('test', 0)):
        assert np.array_equal(np.asarray(a.image(split, i)), np.asarray(b.image(split, i)))
        assert a.captions(split, i) == b.captions(split, i) and a.scene(split, i) == b.scene(split, i)
    other = data.ShapesWorld(seed=4)
    assert [other.captions('train', i) for i in range(10)] != [a.captions('train', i) for i in range(10)]
    assert not np.array_equal(np.asarray(other.image('train', 0)), np.asarray(a.image('train', 0)))


def test_shapesworld_image_is_rgb_of_the_asked_size_with_noisy_background():
    world = data.ShapesWorld(image_size=48, min_objects=2, max_objects=2)
    pixels = np.asarray(world.image('train', 0))
    assert pixels.shape == (48, 48, 3) and len(world.scene('train', 0)) == 2
    assert pixels[..., 0].std() > 0 and len(np.unique(pixels)) > 20


def test_splits_are_disjoint_in_index_and_in_scene_content():
    world = data.ShapesWorld(train_images=3000)
    assert world.num_images('val') == world.num_images('test') == 1000
    keys = {split: {repr(world.scene(split, i)) for i in range(n)}
            for split, n in (('train', 3000), ('val', 1000), ('test', 1000))}
    assert not keys['train'] & keys['val'] and not keys['train'] & keys['test'] and not keys['val'] & keys['test']
    with pytest.raises(IndexError):
        world.scene('test', 1000)


def test_every_caption_is_true_of_its_scene_and_in_the_grammar():
    world = data.ShapesWorld()
    for split, n in (('train', 300), ('test', 100)):
        for i in range(n):
            scene, captions = world.scene(split, i), world.captions(split, i)
            assert len(captions) == data.CAPTIONS_PER_IMAGE and len(set(captions)) >= 3
            for caption in captions:
                assert data.parse_caption(caption) is not None, caption
                assert data.caption_is_true(caption, scene), (caption, scene)


def test_caption_evaluator_on_hand_made_scene():
    scene = [dict(color='red', shape='circle', size='small', row=0, col=0),
             dict(color='blue', shape='square', size='large', row=2, col=1)]
    true = ['a small red circle above a large blue square', 'there is a blue square at the bottom',
            'a red circle is to the left of a square', 'at the top left there is a circle',
            'a square and a red circle', 'a large square is below a circle']
    false = ['a red circle below a blue square', 'there is a blue square at the bottom right',
             'a red circle is to the right of a square', 'a large red circle', 'a square and a blue square',
             'a green cross']
    assert all(data.caption_is_true(c, scene) for c in true)
    assert not any(data.caption_is_true(c, scene) for c in false)
    assert data.parse_caption('a circle on the left') is None and data.parse_caption('at the center left') is None


def test_every_swap_is_false_with_exactly_one_visual_word_changed():
    world, rng = data.ShapesWorld(), np.random.default_rng(0)
    found = dict.fromkeys(data.ATTRIBUTE_WORDS, 0)
    for i in range(150):
        scene = world.scene('test', i)
        for caption in world.captions('test', i):
            for attribute in data.ATTRIBUTE_WORDS:
                swapped = world.swap(caption, scene, attribute, rng)
                if attribute == 'shape' or (attribute == 'color' and set(caption.split()) & set(data.COLORS)):
                    assert swapped is not None  # 4 shapes / 8 colours vs <= 3 objects: always possible
                if swapped is None:
                    continue
                new, k = swapped
                found[attribute] += 1
                assert word_diff(caption, new) == [k]
                assert new.split()[k] in data.ATTRIBUTE_WORDS[attribute] and new.split()[k] in data.VISUAL_WORDS
                assert not data.caption_is_true(new, scene)
    assert min(found.values()) > 100, found


def test_swap_pairs_give_each_image_a_false_one_word_swap_per_attribute():
    world = data.ShapesWorld()
    pairs = world.swap_pairs('test', 40, seed=0)
    assert pairs == world.swap_pairs('test', 40, seed=0)                          # deterministic
    for i, true, swapped, attribute, k in pairs:
        scene = world.scene('test', i)
        assert true in world.captions('test', i) and data.caption_is_true(true, scene)
        assert not data.caption_is_true(swapped, scene) and word_diff(true, swapped) == [k]
        assert swapped.split()[k] in data.ATTRIBUTE_WORDS[attribute]
    covered = {(i, a) for i, _, _, a, _ in pairs}
    assert all((i, 'shape') in covered for i in range(40))  # every caption names a shape: always possible


def test_true_pairs_say_which_captions_of_a_batch_are_true_of_which_images():
    world = data.ShapesWorld()
    scenes = [world.scene('train', i) for i in range(12)]
    captions = [world.captions('train', i)[0] for i in range(12)]
    truth = data.true_pairs(captions, scenes)
    assert truth.shape == (12, 12) and truth.diagonal().all()
    assert truth.tolist() == [[data.caption_is_true(c, s) for c in captions] for s in scenes]


def names_what_the_scene_lacks(caption, k, scene):
    """Word k of caption is a colour, shape or size no object has, or moves 'at the POS' to an empty cell."""
    word = caption.split()[k]
    for attribute in ('color', 'shape', 'size'):
        if word in data.ATTRIBUTE_WORDS[attribute]:
            return all(o[attribute] != word for o in scene)
    cell = data.parse_caption(caption)['cell']
    return cell is not None and all((o['row'], o['col']) != cell for o in scene)


def test_caption_noise_rate_is_p_and_the_changed_word_names_what_the_scene_lacks():
    p, n = 0.2, 2000  # 10k captions
    clean, noisy = data.ShapesWorld(train_images=n), data.ShapesWorld(caption_noise=p, train_images=n)
    noised = 0
    for i in range(n):
        scene, captions = clean.scene('train', i), clean.captions('train', i)
        new, words = noisy.captions_and_noise('train', i)
        for c, c_new, k in zip(captions, new, words):
            if k < 0:
                assert c_new == c
            else:
                noised += 1
                assert word_diff(c, c_new) == [k] and c_new.split()[k] in data.VISUAL_WORDS
                assert not data.caption_is_true(c_new, scene)
                assert names_what_the_scene_lacks(c_new, k, scene)
    assert abs(noised / (5 * n) - p) < 0.02
    for split in ('val', 'test'):  # never noised
        for i in range(200):
            assert noisy.captions_and_noise(split, i) == (clean.captions(split, i), [-1] * 5)


def test_a_scene_with_every_value_keeps_its_caption_clean_rather_than_ending_the_epoch():
    world = data.ShapesWorld(max_objects=9, caption_noise=1.0, train_images=300)
    noise = [k for i in range(300) for k in world.captions_and_noise('train', i)[1]]   # no StopIteration
    assert -1 in noise and np.mean([k >= 0 for k in noise]) > 0.5


def test_noise_mask_marks_the_corrupted_token_after_tokenization(tokenizer):
    world = data.ShapesWorld(caption_noise=0.5, train_images=40)
    dataset = data.ShapesCaptions(world, 'train')
    items = [dataset[k] for k in range(len(dataset))]
    batch = data.collate(items, tokenizer, max_len=32)
    assert batch['noise_mask'].shape == batch['input_ids'].shape
    for b, item in enumerate(items):
        marked = batch['noise_mask'][b].nonzero().flatten().tolist()
        if item['noise_word'] < 0:
            assert marked == []
        else:  # [CLS] first, then one token per word
            assert marked == [item['noise_word'] + 1]
            word = item['caption'].split()[item['noise_word']]
            assert tokenizer.convert_ids_to_tokens(batch['input_ids'][b, marked[0]].item()) == word
    assert 0.3 < (batch['noise_mask'].sum(1) > 0).float().mean() < 0.7


def test_visual_mask_is_aligned_with_tokens(tokenizer):
    dataset = data.ShapesCaptions(data.ShapesWorld(), 'val', max_images=16)
    batch = data.collate([dataset[k] for k in range(16)], tokenizer, max_len=32)
    assert batch['visual_mask'].shape == batch['input_ids'].shape and batch['visual_mask'].dtype == torch.long
    for ids, mask, caption in zip(batch['input_ids'], batch['visual_mask'], [dataset[k]['caption'] for k in range(16)]):
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        assert [t for t, m in zip(tokens, mask) if m] == [w for w in caption.split() if w in data.VISUAL_WORDS]
        assert not any(m and t.startswith('[') for t, m in zip(tokens, mask))


def test_latents_are_4_by_h8_by_w8_and_deterministic():
    world = data.ShapesWorld()
    image = world.transform(world.image('test', 0))  # (3, 64, 64)
    z = data.latents(image)
    assert z.shape == (4, 8, 8) and torch.equal(z, data.latents(world.transform(world.image('test', 0))))
    assert torch.allclose(z[:3], image.reshape(3, 8, 8, 8, 8).mean((2, 4)), atol=1e-6)
    assert data.latents(image.expand(2, 3, 64, 64)).shape == (2, 4, 8, 8)
    item = data.ShapesCaptions(world, 'test', image_input='latents')[0]
    assert torch.equal(item['image'], z)
    with pytest.raises(UserError, match='divisible by 8'):
        data.latents(torch.zeros(3, 60, 60))


# ----------------------------------------------------------------------------- caption JSON (COCO / Flickr / any)

def _save_image(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (40, 30), color).save(path)


def make_karpathy_folder(root, prefix='coco_karpathy_'):
    """A tiny COCO-like folder: 3 train images (2 captions each), 2 val and 2 test images (2 captions each)."""
    for k in range(7):
        _save_image(root / 'val2014' / f'{k}.jpg', (30 * k, 100, 50))
    train = [dict(image=f'val2014/{k}.jpg', caption=f'A dog, on the LEFT #{j}!', image_id=f'coco_{k}')
             for k in range(3) for j in range(2)]
    (root / f'{prefix}train.json').write_text(json.dumps(train))
    for split, ks in (('val', (3, 4)), ('test', (5, 6))):
        rows = [dict(image=f'val2014/{k}.jpg', caption=[f'a cat {k}', f'two cats {k}.']) for k in ks]
        (root / f'{prefix}{split}.json').write_text(json.dumps(rows))


def test_karpathy_folder_loads_train_rows_per_caption_and_eval_rows_per_image(tmp_path, tokenizer):
    make_karpathy_folder(tmp_path)
    train = data.build_dataset(RunConfig(data='coco', data_root=str(tmp_path), image_size=32), 'train')
    assert len(train) == 6
    item = train[1]
    assert item['image'].shape == (3, 32, 32) and item['image_id'] == 0
    assert item['caption'] in ('a dog, on the left 1', 'a dog, on the right 1')  # cleaned, maybe flipped
    test = data.build_dataset(RunConfig(data='coco', data_root=str(tmp_path), image_size=32), 'test')
    assert len(test) == 2 and test.texts == ['a cat 5', 'two cats 5', 'a cat 6', 'two cats 6']
    assert test.txt2img == [0, 0, 1, 1] and test.img2txt == [[0, 1], [2, 3]]
    batch = next(iter(data.eval_loader(test, 2, partial(data.collate, tokenizer=tokenizer, max_len=16))))
    assert batch['image'].shape == (2, 3, 32, 32) and batch['captions'][1] == ['a cat 6', 'two cats 6.']  # raw
    assert batch['image_id'].tolist() == [0, 1] and batch['n_bad'] == 0
    make_karpathy_folder(tmp_path, 'flickr30k_')
    assert len(data.build_dataset(RunConfig(data='flickr30k', data_root=str(tmp_path), image_size=32), 'val')) == 2


def test_generic_json_and_jsonl_rows_with_images_or_latents(tmp_path):
    _save_image(tmp_path / 'a.png')
    (tmp_path / 'rows.json').write_text(json.dumps([dict(image='a.png', caption='one'),
                                                     dict(image='a.png', caption=['two', 'three'])]))
    dataset = data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'rows.json'), image_size=16,
                                           split_ratio=(1.0, 0.0, 0.0)), 'train')
    assert [dataset[k]['caption'] for k in range(3)] == ['one', 'two', 'three']
    torch.save(torch.ones(4, 2, 2), tmp_path / 'z.pt')
    np.save(tmp_path / 'z.npy', np.zeros((4, 2, 2), np.float32))
    lines = [json.dumps(dict(latent='z.pt', caption='a latent')), json.dumps(dict(latent='z.npy', caption='b'))]
    (tmp_path / 'lat_test.jsonl').write_text('\n'.join(lines))
    latent_set = data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'lat_{split}.jsonl')), 'test', image_input='latents')
    assert torch.equal(latent_set[0]['image'], torch.ones(4, 2, 2)) and latent_set[1]['image'].shape == (4, 2, 2)
    with pytest.raises(UserError, match="'latent' paths"):
        data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'rows.json'), split_ratio=(1.0, 0.0, 0.0)),
                           'train', image_input='latents')


def test_pre_caption_cleans_like_blip():
    assert data.pre_caption('  A Dog!! runs (fast);  home.\n', max_words=30) == 'a dog runs fast home'
    assert data.pre_caption('one two three four', max_words=2) == 'one two'


def test_train_flip_swaps_left_and_right_words_with_the_image():
    image = Image.new('RGB', (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 64))  # left red, right blue
    transform = data.ImageTransform(32, train=True)
    seen = set()
    torch.manual_seed(0)
    for _ in range(20):
        pixels, caption = transform(image, 'a red half on the left and blue on the right, rightly')
        flipped = caption == 'a red half on the right and blue on the left, rightly'
        assert flipped or caption == 'a red half on the left and blue on the right, rightly'
        left_is_red = pixels[0, :, 0].mean() > pixels[2, :, 0].mean()
        assert left_is_red != flipped
        seen.add(flipped)
    assert seen == {True, False}
    eval_pixels, eval_caption = data.ImageTransform(32, train=False)(image, 'on the left')
    assert eval_caption == 'on the left' and eval_pixels.shape == (3, 32, 32)
    assert data.flip_caption('left right leftover') == 'right left leftover'


# ----------------------------------------------------------------------------- loaders

def test_train_batches_resume_from_start_step_equals_the_uninterrupted_run(tokenizer):
    dataset = data.ShapesCaptions(data.ShapesWorld(train_images=10), 'train')  # 50 rows: 6 batches of 8 / epoch
    collate = partial(data.collate, tokenizer=tokenizer, max_len=32)
    fresh = data.train_batches(dataset, 8, collate, seed=1)
    run = [next(fresh) for _ in range(15)]  # crosses two epoch boundaries
    for k in (4, 6, 9):
        resumed = data.train_batches(dataset, 8, collate, seed=1, start_step=k)
        for expected in run[k:k + 4]:
            got = next(resumed)
            assert got['index'].tolist() == expected['index'].tolist() and torch.equal(got['image'], expected['image'])
            assert torch.equal(got['input_ids'], expected['input_ids'])
    first_epoch = [c for batch in run[:6] for c in batch['input_ids'].tolist()]
    assert len(first_epoch) == 48
    assert run[0]['index'].tolist() != run[6]['index'].tolist()  # reshuffled each epoch


GRIDS = ((4, 8, 8), (4, 6, 10), (4, 4, 12))  # latents of 256x256, 192x320, 128x384 images


def latents_in_three_grids(root, counts=(7, 5, 4)):
    """lat_{split}.json (the same rows for each split): counts[g] latents of GRIDS[g], grids interleaved, .npy and
    .pt alternating, one caption each; latent i (image_id i) is filled with i. -> each image's grid."""
    grids = [GRIDS[g] for k in range(max(counts)) for g in range(3) if k < counts[g]]
    for i, grid in enumerate(grids):
        if i % 2:
            torch.save(torch.full(grid, float(i)), root / f'{i}.pt')
        else:
            np.save(root / f'{i}.npy', np.full(grid, i, np.float32))
    rows = [dict(latent=f"{i}.{'pt' if i % 2 else 'npy'}", caption=f'a red circle {i}') for i in range(len(grids))]
    for split in data.SPLITS:
        (root / f'lat_{split}.json').write_text(json.dumps(rows))
    return grids


def test_latents_in_several_grids_train_and_evaluate_in_batches_of_one_grid(tmp_path, tokenizer):
    grids = latents_in_three_grids(tmp_path)  # 7 + 5 + 4 images: 3 + 2 + 2 full batches of 2 an epoch
    cfg = RunConfig(data='json', ann_file=str(tmp_path / 'lat_{split}.json'))
    train = data.build_dataset(cfg, 'train', image_input='latents')
    assert train.image_shapes == grids  # read from .npy and .pt headers
    collate = partial(data.collate, tokenizer=tokenizer, max_len=16)
    fresh = data.train_batches(train, 2, collate, seed=1)
    run = [next(fresh) for _ in range(17)]  # crosses two epoch boundaries
    ids = [batch['image_id'].tolist() for batch in run]
    for batch, batch_ids in zip(run, ids):  # one grid per batch, each latent its own
        assert tuple(batch['image'].shape[1:]) in GRIDS and batch['image'][:, 0, 0, 0].tolist() == batch_ids
    for epoch in (ids[:7], ids[7:14]):  # every full batch of every grid once
        seen = [i for batch_ids in epoch for i in batch_ids]
        assert len(set(seen)) == 14 and sorted(grids[b[0]] for b in epoch) == sorted(GRIDS * 2 + GRIDS[:1])
    assert ids[:7] != ids[7:14]  # reshuffled each epoch
    for k in (3, 7, 10):
        resumed = data.train_batches(train, 2, collate, seed=1, start_step=k)
        assert [next(resumed)['image_id'].tolist() for _ in range(4)] == ids[k:k + 4]
    by_rank = []
    for rank in (0, 1):  # 7 batches: 3 each, the 7th dropped
        batches = data.train_batches(train, 2, collate, seed=1, rank=rank, world_size=2)
        by_rank.append([i for _ in range(3) for i in next(batches)['image_id'].tolist()])
        assert len(data.bucket_batches(data.shape_buckets(train), 2, 1, 0, rank, 2)) == 3
    assert len(set(by_rank[0])) == len(set(by_rank[1])) == 6 and not set(by_rank[0]) & set(by_rank[1])
    batches = list(data.eval_loader(data.build_dataset(cfg, 'test', image_input='latents'), 3, collate))
    assert [b['image_id'].tolist() for b in batches] == [[0, 3, 6], [9, 12, 14], [15], [1, 4, 7], [10, 13],
                                                         [2, 5, 8], [11]]  # by grid, in order, last partial
    assert all(b['image'][:, 0, 0, 0].tolist() == b['image_id'].tolist() for b in batches)


def test_train_batches_shard_one_epoch_disjointly_across_ranks(tokenizer):
    dataset = data.ShapesCaptions(data.ShapesWorld(train_images=8), 'train')  # 40 rows
    collate = partial(data.collate, tokenizer=tokenizer, max_len=32)
    rows = []
    for rank in (0, 1):
        batches = data.train_batches(dataset, 5, collate, seed=0, rank=rank, world_size=2)
        rows += [(i, c) for _ in range(4) for batch in [next(batches)]
                 for i, c in zip(batch['index'].tolist(), batch['input_ids'].tolist())]
    assert len(rows) == 40 and len({(i, tuple(c)) for i, c in rows}) >= 38  # identical captions may repeat


# ----------------------------------------------------------------------------- bad input

def test_wrong_data_root_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=r"--data_root .*nowhere.* is not a folder.*val2014"):
        data.build_dataset(RunConfig(data='coco', data_root=str(tmp_path / 'nowhere')), 'train')


def test_missing_annotation_file_says_which_file_to_put_where(tmp_path):
    with pytest.raises(UserError) as e:
        data.build_dataset(RunConfig(data='flickr30k', data_root=str(tmp_path)), 'test')
    message = str(e.value)
    assert str(tmp_path / 'flickr30k_test.json') in message and 'NANOALIGN_OFFLINE' in message
    assert 'https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_test.json' in message


def test_missing_annotation_file_is_fetched_when_the_network_allows(tmp_path, monkeypatch):
    source = tmp_path / 'server'
    make_karpathy_folder(source)
    root = tmp_path / 'coco'
    root.mkdir()
    (root / 'val2014').symlink_to(source / 'val2014')
    monkeypatch.delenv('NANOALIGN_OFFLINE')
    monkeypatch.setattr(data, 'KARPATHY_URL', source.as_uri() + '/{}.json')  # file:// stands in for https://
    assert len(data.build_dataset(RunConfig(data='coco', data_root=str(root), image_size=16), 'val')) == 2
    assert (root / 'coco_karpathy_val.json').read_text() == (source / 'coco_karpathy_val.json').read_text()


def test_missing_ann_file_and_wrong_image_root_are_user_errors(tmp_path):
    with pytest.raises(UserError, match='does not exist'):
        data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'none.json')), 'train')
    with pytest.raises(UserError, match='needs --ann_file'):
        data.build_dataset(RunConfig(data='json'), 'train')
    make_karpathy_folder(tmp_path)
    (tmp_path / 'elsewhere').mkdir()
    (tmp_path / 'elsewhere' / 'coco_karpathy_val.json').write_text((tmp_path / 'coco_karpathy_val.json').read_text())
    with pytest.raises(UserError, match=r"val2014/3.jpg does not exist.*--data_root"):
        data.build_dataset(RunConfig(data='coco', data_root=str(tmp_path / 'elsewhere')), 'val')


@pytest.mark.parametrize('content, expected', [
    ('{"images": []}', r"expected a non-empty JSON list.*got a dict with keys \['images'\]"),
    ('[]', 'expected a non-empty JSON list'),
    ('[{"image": "a.jpg", "text": "a dog"}]', r"row 0 .* needs 'caption'"),
    ('[{"image": "a.jpg", "caption": "ok"}, {"caption": "no image"}]', r"row 1 .*'image'"),
    ('[{"image": "a.jpg", "caption": "a dog"},', r'not valid JSON .*line 1'),
])
def test_json_of_the_wrong_shape_or_syntax_names_the_file(tmp_path, content, expected):
    path = tmp_path / 'bad.json'
    path.write_text(content)
    with pytest.raises(UserError, match=expected) as e:
        data.build_dataset(RunConfig(data='json', ann_file=str(path)), 'train')
    assert str(path) in str(e.value)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"image": "a.jpg", "caption": "a"}\n{"image": oops}\n')
    with pytest.raises(UserError, match=r'not valid JSON.*oops'):
        data.build_dataset(RunConfig(data='json', ann_file=str(path)), 'train')


def test_empty_caption_names_the_file_and_row(tmp_path):
    _save_image(tmp_path / 'a.jpg')
    path = tmp_path / 'rows.json'
    path.write_text(json.dumps([dict(image='a.jpg', caption='fine'), dict(image='a.jpg', caption=' ... ')]))
    with pytest.raises(UserError, match=r'rows.json: row 1 has an empty caption'):
        data.build_dataset(RunConfig(data='json', ann_file=str(path)), 'train')


def test_a_single_ann_file_is_split_by_image_path_disjointly_and_stably(tmp_path, capsys):
    rows = [dict(image=f'img/{k}.png', caption=[f'image {k}', f'picture {k}']) for k in range(300)]
    _save_image(tmp_path / 'img' / '0.png')  # the loader checks the first path of its split
    for k in range(1, 300):
        os.link(tmp_path / 'img' / '0.png', tmp_path / 'img' / f'{k}.png')
    (tmp_path / 'rows.json').write_text(json.dumps(rows))
    (tmp_path / 'shuffled.json').write_text(json.dumps(rows[::-1]))

    def images(ann_file, split):
        cfg = RunConfig(data='json', ann_file=str(tmp_path / ann_file), image_size=16)
        return {path for _, path in data.build_dataset(cfg, split).paths}

    splits = {split: images('rows.json', split) for split in data.SPLITS}
    assert set.union(*splits.values()) == {row['image'] for row in rows}
    assert sum(map(len, splits.values())) == 300                       # disjoint: no image in two splits
    assert len(splits['train']) > 240 and splits['val'] and splits['test']   # about 90 / 5 / 5
    assert all(images('shuffled.json', split) == splits[split] for split in data.SPLITS)  # any row order
    assert f"{len(splits['train'])} / {len(splits['val'])} / {len(splits['test'])} images" in capsys.readouterr().out
    with pytest.raises(UserError, match='leaves no image for the val split'):
        data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'rows.json'), split_ratio=(1.0, 0.0, 0.0)), 'val')


def test_eval_only_and_resume_on_one_ann_file_keep_the_checkpoints_split(tmp_path):
    cfg = RunConfig(data='json', ann_file=str(tmp_path / 'caps.json'), out_dir=str(tmp_path), eval_only=True,
                    split_ratio=(0.8, 0.1, 0.1))
    model = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'toy', model, torch.optim.SGD(model.parameters(), lr=1), 5, cfg)
    common.check_split(cfg, 'toy')                                     # the same split: fine
    with pytest.raises(UserError, match=r'trained at --split_ratio 0.8,0.1,0.1; .* pass --split_ratio 0.8,0.1,0.1'):
        common.check_split(replace(cfg, split_ratio=(0.9, 0.05, 0.05)), 'toy')
    argv = ['--data', 'json', '--ann_file', str(tmp_path / 'caps.json'), '--out_dir', str(tmp_path), '--resume', 'true']
    with pytest.raises(UserError, match='trained at --split_ratio 0.8,0.1,0.1'):
        parse_config(ToyConfig, dict(TOY_PRESETS, json={}), argv, stem='toy')


def test_eval_references_are_the_raw_captions_and_only_the_model_input_is_cleaned(tmp_path):
    long = 'A Red circle, ' + ' '.join(f'word{k}' for k in range(40)) + '.'
    _save_image(tmp_path / 'a.png')
    (tmp_path / 'rows.json').write_text(json.dumps([dict(image='a.png', caption=[long, 'Two  spaces!'])]))
    test = data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'rows.json'), image_size=16,
                                        split_ratio=(0.0, 0.0, 1.0)), 'test')
    assert test[0]['captions'] == [long, 'Two spaces!']                 # what caption_metrics scores
    assert test.texts == [data.pre_caption(long), 'two spaces'] and len(test.texts[0].split()) == 30


def test_unreadable_images_are_skipped_counted_and_bounded_by_max_bad_images(tmp_path, tokenizer):
    for k in range(4):
        _save_image(tmp_path / f'{k}.jpg')
    (tmp_path / '2.jpg').write_bytes(b'not a jpeg')
    (tmp_path / 'rows.json').write_text(json.dumps([dict(image=f'{k}.jpg', caption=f'image {k}') for k in range(4)]))
    dataset = data.build_dataset(RunConfig(data='json', ann_file=str(tmp_path / 'rows.json'), image_size=16,
                                           split_ratio=(1.0, 0.0, 0.0)), 'train')
    collate = partial(data.collate, tokenizer=tokenizer, max_len=8)
    with pytest.warns(UserWarning, match='2.jpg'):
        assert dataset[2] is None
        batch = collate([dataset[k] for k in range(4)])
    assert batch['n_bad'] == 1 and batch['image'].shape[0] == 3
    with pytest.warns(UserWarning):
        batches = data.train_batches(dataset, 4, collate, seed=0, max_bad_images=1)
        assert next(batches)['n_bad'] == 1
        with pytest.raises(UserError, match=r'2 images could not be read.*--max_bad_images 1'):
            next(batches)

# ============================================================================= backbones.py

# ----------------------------------------------------------------------------- own ViT / BERT modules against Hugging Face

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
TINY_VISION = dict(image_size=32, patch_size=8, **TINY)
TINY_TEXT = dict(vocab_size=50, max_position_embeddings=16, **TINY)


def saved_and_reloaded(model, path, attn_implementation):
    """Perturb every parameter (so a missed or swapped key cannot hide behind a default init such as LN weight 1,
    bias 0), save_pretrained, and reload through from_pretrained: the real loading path."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return type(model).from_pretrained(path, attn_implementation=attn_implementation).eval()


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
@pytest.mark.parametrize('hf_cls, cfg_cls', [(ViTModel, ViTConfig), (DeiTModel, DeiTConfig),
                                             (CLIPVisionModel, CLIPVisionConfig)])


def test_loaded_vit_reproduces_hf_last_hidden_state(tmp_path, attn, hf_cls, cfg_cls):
    hf = saved_and_reloaded(hf_cls(cfg_cls(**TINY_VISION)), tmp_path, attn)
    vit = vit_from_hf(hf).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, ours = hf(pixel_values=images), vit(images)
    n_special = 2 if hf_cls is DeiTModel else 1  # DeiT: [CLS] + distillation token
    assert ours.shape == (2, n_special + 16, 32)
    assert (ours - ref.last_hidden_state).abs().max() < 1e-4
    if hf_cls is CLIPVisionModel:  # CLIP: post_layernorm only on the pooled CLS, kept as vit.norm
        assert (vit.norm(ours[:, 0]) - ref.pooler_output).abs().max() < 1e-4


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_loaded_bert_reproduces_hf_last_hidden_state_at_non_pad_positions(tmp_path, attn):
    hf = saved_and_reloaded(BertModel(BertConfig(**TINY_TEXT)), tmp_path, attn)
    emb, layers, head, new = bert_from_hf(hf)
    torch.manual_seed(1)
    ids = torch.randint(5, 50, (3, 10))
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 6:], am[2, 3:] = 0, 0
    ids[am == 0] = 0
    x = emb.eval()(ids)
    for layer in layers.eval():
        x = layer(x, mask=padding_mask(am))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
    assert (x - ref)[am.bool()].abs().max() < 1e-4
    assert new and all(k.startswith('mlm_head.') and 'decoder.weight' not in k for k in new)  # bare BertModel


def test_mlm_head_reproduces_bert_for_masked_lm_logits(tmp_path):
    hf = saved_and_reloaded(BertForMaskedLM(BertConfig(**TINY_TEXT)), tmp_path, 'sdpa')
    emb, layers, head, new = bert_from_hf(hf)
    assert new == [] and head.decoder.weight is emb.word.weight  # all loaded; decoder tied to the embeddings
    ids = torch.randint(5, 50, (2, 9))
    x = emb.eval()(ids)
    for layer in layers.eval():
        x = layer(x)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (head(x) - ref).abs().max() < 1e-4


def test_decoder_with_causal_self_attention_and_cross_attention_reproduces_hf_bert_lm_head_model(tmp_path):
    # BertLMHeadModel(is_decoder, add_cross_attention) is BLIP's decoder: causal self-attn -> cross-attn -> FFN
    cfg = BertConfig(is_decoder=True, add_cross_attention=True, **TINY_TEXT)
    hf = saved_and_reloaded(BertLMHeadModel(cfg), tmp_path, 'sdpa')
    emb, layers, head, new = bert_from_hf(hf, cross_layers=range(2))
    assert new == []  # the HF model has cross-attention weights, so they are copied too
    ids, image = torch.randint(5, 50, (2, 7)), torch.randn(2, 5, 32)
    am = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    x = emb.eval()(ids)
    for layer in layers.eval():
        x = layer(x, mask=padding_mask(am) + causal_mask(7), context=image)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=am, encoder_hidden_states=image).logits
    assert (head(x) - ref)[am.bool()].abs().max() < 1e-4


def test_cross_attention_weights_are_new_and_reported_others_loaded(tmp_path):
    hf = saved_and_reloaded(BertModel(BertConfig(**TINY_TEXT)), tmp_path, 'sdpa')
    emb, layers, head, new = bert_from_hf(hf, cross_layers=[1], cross_dim=24)
    layer_new = [k for k in new if k.startswith('layers.')]
    assert layer_new and all(k.startswith(('layers.1.cross_attn.', 'layers.1.norm_cross.')) for k in layer_new)
    assert layers[0].cross_attn is None and layers[1].cross_attn.k.in_features == 24
    assert torch.equal(layers[1].self_attn.q.weight, hf.encoder.layer[1].attention.self.query.weight)


def test_cross_attention_output_depends_on_context():
    torch.manual_seed(0)
    layer = BertLayer(32, 4, 64, cross_attention=True, cross_dim=24).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    assert (layer(x, context=ctx) - layer(x, context=torch.randn(2, 7, 24))).abs().max() > 1e-3
    ctx_mask = padding_mask(torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    changed = ctx.clone()
    changed[1, 4:] = 100.0  # masked context tokens must not matter
    assert torch.allclose(layer(x, context=ctx, context_mask=ctx_mask),
                          layer(x, context=changed, context_mask=ctx_mask), atol=1e-5)


def test_causal_mask_makes_position_i_independent_of_later_positions():
    torch.manual_seed(0)
    layer = BertLayer(32, 4, 64).eval()
    x = torch.randn(2, 6, 32)
    later_changed = x.clone()
    later_changed[:, 4:] = torch.randn(2, 2, 32)
    out, out2 = layer(x, mask=causal_mask(6)), layer(later_changed, mask=causal_mask(6))
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-6)
    assert (out[:, 4:] - out2[:, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_row_with_no_visible_key_stays_finite_when_padding_and_causal_masks_are_summed(dtype):
    torch.manual_seed(0)
    attn = Attention(16, 2).to(dtype).eval()
    am = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # left padding: query 0 of row 1 sees nothing
    mask = padding_mask(am) + causal_mask(4)         # min + min = -inf where both hide; Attention clamps
    for return_attn in (False, True):
        out, _ = attn(torch.randn(2, 4, 16, dtype=dtype), mask=mask, return_attn=return_attn)
        assert torch.isfinite(out).all()


def test_attention_map_path_equals_fused_path_and_hides_masked_keys():
    torch.manual_seed(0)
    attn = Attention(16, 2, kv_dim=8).eval()
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    mask = padding_mask(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    fused, none = attn(x, ctx, mask)
    explicit, probs = attn(x, ctx, mask, return_attn=True)
    assert none is None and probs.shape == (2, 2, 3, 5)
    assert torch.allclose(fused, explicit, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 3)) and probs[0, :, :, 3:].max() == 0


def test_pos_embed_interpolation_is_identity_at_same_size_and_matches_hf_for_larger_images(tmp_path):
    pos = torch.randn(1, 1 + 16, 32)
    assert interpolate_pos_embed(pos, 1, 4) is pos
    hf = saved_and_reloaded(ViTModel(ViTConfig(**TINY_VISION)), tmp_path, 'sdpa')
    vit = vit_from_hf(hf, image_size=48).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = hf(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        ours = vit(images)
    assert ours.shape == (2, 1 + 36, 32)  # 6x6 grid at 48 px with 8 px patches
    assert (ours - ref).abs().max() < 1e-4


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, dim=16, depth=2, heads=2, mlp_dim=32)
    images = torch.randn(2, 3, 16, 16)
    grads = []
    for on in (False, True):
        vit.zero_grad()
        vit.grad_checkpointing = on
        vit(images).square().mean().backward()
        grads.append([p.grad.clone() for p in vit.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))

# ----------------------------------------------------------------------------- loading and the built-in backbones

def test_tokenizer_round_trips_text_and_save_pretrained(tokenizer, tmp_path):
    from transformers import AutoTokenizer
    assert [tokenizer.convert_tokens_to_ids(t) for t in backbones.SPECIAL_TOKENS] == list(range(6))
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id, tokenizer.bos_token_id) == (0, 1, 2, 3, 4, 5)
    world = data.ShapesWorld()
    texts = [c for i in range(50) for c in world.captions('train', i)]
    texts += list(backbones.PROMPTS)
    enc = tokenizer(texts)
    assert all(tokenizer.unk_token_id not in ids for ids in enc.input_ids)
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in enc.input_ids)
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in enc.input_ids] == texts
    assert tokenizer('A Red circle?').input_ids == tokenizer('a red circle ?').input_ids
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(texts).input_ids == enc.input_ids and len(reloaded) == len(tokenizer) == len(backbones.VOCAB)
    assert reloaded.bos_token == '[DEC]' and reloaded.mask_token_id == 4


def test_builtin_backbones_are_saved_with_their_quality_and_load_through_from_pretrained(builtin_backbones,
                                                                                         monkeypatch):
    monkeypatch.setattr(backbones, 'BACKBONE_DIR', builtin_backbones)
    vision = backbones.load_backbone('shapes-tiny-vision', 'vision')
    text = backbones.load_backbone('shapes-tiny-text', 'mlm')
    lm = backbones.load_backbone('shapes-tiny-lm', 'lm')
    assert (type(vision).__name__, type(text).__name__, type(lm).__name__) == \
        ('ViTModel', 'BertForMaskedLM', 'Qwen2ForCausalLM')
    quality = {name: json.loads((builtin_backbones / name / 'quality.json').read_text())
               for name in backbones.BUILTIN_BACKBONES}
    assert set(quality['shapes-tiny-vision']) == {'val_attribute_acc', 'val_presence_acc', 'steps', 'seconds'}
    assert 0 <= quality['shapes-tiny-text']['val_mlm_acc'] <= 100 and quality['shapes-tiny-lm']['val_perplexity'] > 1
    words = 'describe the picture : a red circle ?'
    for name in ('shapes-tiny-text', 'shapes-tiny-lm'):  # the LM's qwen2 type must not make it a byte-level BPE
        assert backbones.load_tokenizer(name)(words).input_ids == backbones.build_tokenizer()(words).input_ids, name
    assert not list(builtin_backbones.glob('*.tmp'))      # built in a temp folder, then renamed


def test_own_modules_loaded_from_the_builtin_backbones_reproduce_their_hidden_states(builtin_backbones,
                                                                                     monkeypatch):
    monkeypatch.setattr(backbones, 'BACKBONE_DIR', builtin_backbones)
    world, tokenizer = data.ShapesWorld(), backbones.build_tokenizer()
    images = torch.stack([world.transform(world.image('val', i)) for i in range(4)])
    hf_vision = backbones.load_backbone('shapes-tiny-vision', 'vision').eval()
    with torch.no_grad():
        diff = (vit_from_hf(hf_vision).eval()(images) - hf_vision(images).last_hidden_state).abs().max()
    assert diff < 1e-4
    hf_text = backbones.load_backbone('shapes-tiny-text', 'text').eval()
    emb, layers, _, _ = bert_from_hf(hf_text)
    enc = tokenizer(world.captions('val', 0)[:3], padding=True, return_tensors='pt')
    with torch.no_grad():
        x = emb.eval()(enc.input_ids)
        for layer in layers.eval():
            x = layer(x, padding_mask(enc.attention_mask))
        reference = hf_text(**enc).last_hidden_state
    valid = enc.attention_mask.bool()
    assert (x - reference)[valid].abs().max() < 1e-4


@pytest.mark.parametrize('name, kind, message', [
    ('no-such-org/no-such-model', 'vision', "unknown backbone 'no-such-org/no-such-model'"),
    ('shapes-tiny-audio', 'vision', "unknown built-in backbone 'shapes-tiny-audio'"),
    ('shapes-tiny-lm', 'vision', "is a qwen2 model, which is not a vision backbone"),
])
def test_backbone_mistakes_get_one_clear_message(builtin_backbones, monkeypatch, name, kind, message):
    monkeypatch.setattr(backbones, 'BACKBONE_DIR', builtin_backbones)
    with pytest.raises(UserError, match=message):
        backbones.load_backbone(name, kind)


def test_a_backbone_folder_without_model_or_tokenizer_files_is_named(tmp_path):
    with pytest.raises(UserError, match=f"backbone folder '{tmp_path}' has no config.json"):
        backbones.load_backbone(str(tmp_path), 'vision')
    with pytest.raises(UserError, match=f"backbone folder '{tmp_path}' has no tokenizer files"):
        backbones.load_tokenizer(str(tmp_path))

# ============================================================================= albef_epic.py

import albef_epic as ae

AE_TINY = ['--max_steps', '4', '--batch_size', '8', '--queue_size', '32', '--eval_images', '8', '--k_test', '4',
           '--log_every', '1', '--warmup_steps', '2', '--alpha_warmup_steps', '2', '--embed_dim', '16']


@pytest.fixture
def albef(tiny_backbones):
    def build(*argv):
        cfg = common.parse_config(ae.Config, ae.PRESETS, AE_TINY + list(argv))
        torch.manual_seed(0)
        return cfg, ae.AlbefEpic(cfg, backbones.load_backbone('shapes-tiny-vision', 'vision'),
                                 backbones.load_backbone('shapes-tiny-text', 'mlm'), backbones.build_tokenizer())
    return build


def shapes_train_batch(n, start=0, stride=1):  # stride 5: one caption of each of n images
    items = [data.ShapesCaptions(data.ShapesWorld(), 'train')[k] for k in range(start, start + n * stride, stride)]
    return ae.pair_labels(data.collate(items, backbones.build_tokenizer(), 32), data.ShapesWorld())


def test_ita_targets_mix_teacher_softmax_and_positives_spread_evenly():
    sims_m = torch.tensor([[2.0, 0.0, 0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0, 0.0, 1.0]])        # the own pair and a same-image entry in the queue
    soft = torch.tensor([math.e ** 2, 1, 1, math.e]) / (math.e ** 2 + 2 + math.e)
    torch.testing.assert_close(ae.ita_targets(sims_m, positives, 0.4), 0.4 * soft[None] + 0.6 * torch.tensor([[0.5, 0, 0, 0.5]]))
    torch.testing.assert_close(ae.ita_targets(sims_m, positives, 0.0), torch.tensor([[0.5, 0.0, 0.0, 0.5]]))


def test_positives_are_the_own_pair_plus_same_image_or_same_text_in_batch_and_queue():
    image_id, key = torch.tensor([7, 8]), torch.tensor([100, 200])
    bank_id = torch.tensor([7, 8, -1, 8, 9, 7])              # gathered batch (2), then a queue of 4
    bank_key = torch.tensor([100, 200, -1, 300, 200, 400])
    expected = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 1, 0, 1, 1, 0]]).float()
    torch.testing.assert_close(ae.positive_mask(image_id, key, bank_id, bank_key, True), expected)
    torch.testing.assert_close(ae.positive_mask(image_id, key, bank_id, bank_key, False), torch.eye(2, 6))


def test_queue_wraps_around_and_keeps_ids_and_text_keys_with_the_features(albef):
    cfg, model = albef('--queue_size', '12', '--batch_size', '4')
    for k in range(4):  # 4 batches of 4 into a queue of 12: the 4th overwrites the 1st
        feat = torch.full((4, 16), float(k))
        model.enqueue(feat, -feat, torch.arange(4) + 10 * k, torch.arange(4) + 100 * k)
    assert int(model.queue_ptr) == 4
    assert model.id_queue.tolist() == [30, 31, 32, 33, 10, 11, 12, 13, 20, 21, 22, 23]
    assert model.key_queue[:4].tolist() == [300, 301, 302, 303]
    assert (model.image_queue[:4] == 3).all() and (model.text_queue[4:8] == -1).all()


def test_hard_negatives_never_pick_a_positive_and_work_at_batch_2():
    torch.manual_seed(0)
    sims = torch.randn(6, 6) * 5
    same = torch.eye(6, dtype=torch.bool)
    same[0, 3] = same[3, 0] = same[1, 2] = same[2, 1] = True  # same image (or identical text)
    for _ in range(200):
        picked = ae.sample_negatives(sims, same)
        assert not same[torch.arange(6), picked].any()
    assert ae.sample_negatives(torch.tensor([[9.0, -9.0], [-9.0, 9.0]]), torch.eye(2)).tolist() == [1, 0]
    assert ae.sample_negatives(torch.zeros(2, 2), torch.ones(2, 2)).tolist() == [1, 0]  # no negative: the other row


def test_hardness_0_draws_itm_negatives_uniformly_and_1_by_similarity():
    sims = torch.tensor([[0.0, 30.0, 0.0, 0.0]]).repeat(4, 1)          # column 1 looks like every row's match
    same = torch.eye(4, dtype=torch.bool)
    torch.manual_seed(0)
    hard = torch.stack([ae.sample_negatives(1.0 * sims, same) for _ in range(300)])
    easy = torch.stack([ae.sample_negatives(0.0 * sims, same) for _ in range(300)])
    assert (hard[:, 0] == 1).all()                                     # the most similar one, every time
    assert 0.25 < (easy[:, 0] == 1).float().mean() < 0.42              # one of three, uniformly


def test_mlm_masks_about_15_percent_and_never_a_special_token():
    tokenizer = backbones.build_tokenizer()
    special = torch.tensor(tokenizer.all_special_ids)
    enc = tokenizer([c for i in range(200) for c in data.ShapesWorld().captions('val', i)], padding=True,
                    return_tensors='pt')
    maskable = enc.attention_mask.bool() & ~torch.isin(enc.input_ids, special)
    torch.manual_seed(0)
    masked, labels = ae.mask_tokens(enc.input_ids, maskable, tokenizer.mask_token_id, special, len(tokenizer), 0.15)
    chosen = labels != -100
    assert not (chosen & ~maskable).any() and (masked[~chosen] == enc.input_ids[~chosen]).all()
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.02
    as_mask = (masked[chosen] == tokenizer.mask_token_id).float().mean()
    kept = (masked[chosen] == enc.input_ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.04 and 0.05 < kept < 0.15       # 10% kept (+ random draws of the same word)
    assert not torch.isin(masked[chosen & (masked != tokenizer.mask_token_id)], special).any()


@pytest.mark.parametrize('n_words', [1, 2, 3, 6, 10])
def test_epic_masks_ceil_035_n_of_the_words_and_never_a_special_token(n_words):
    allowed = torch.zeros(2, 14, dtype=torch.bool)
    allowed[:, 1:1 + n_words] = True                         # [CLS] w1..wn [SEP] [PAD]...
    chosen = ae.top_fraction(torch.rand(2, 14), allowed, 0.35)
    assert chosen.sum(1).tolist() == [math.ceil(0.35 * n_words)] * 2 and not (chosen & ~allowed).any()
    scores = torch.arange(14.0).expand(2, 14)                # the highest-scoring words are the ones taken
    assert ae.top_fraction(scores, allowed, 0.35)[0].nonzero().flatten().tolist() == \
        list(range(n_words + 1 - math.ceil(0.35 * n_words), n_words + 1))


def test_consistency_labels_mark_exactly_the_changed_tokens():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    chosen = torch.tensor([[False, True, False, True, True, False]])
    gen_logits = torch.full((1, 6, 20), -50.0)
    gen_logits[0, 1, 15] = gen_logits[0, 3, 12] = gen_logits[0, 4, 0] = gen_logits[0, 4, 16] = 50.0
    corrupted, consistent = ae.rewrite(ids, chosen, gen_logits, torch.arange(6))   # ids 0..5 are special
    assert corrupted.tolist() == [[2, 15, 11, 12, 16, 3]]   # position 3 re-drew its own word; 4 never a special
    assert consistent.tolist() == [[1, 0, 1, 1, 0, 1]]


def test_momentum_update_is_an_exponential_moving_average(albef):
    cfg, model = albef('--momentum', '0.9')
    with torch.no_grad():
        for p_t, p_s in zip(model.teacher.parameters(), model.student.parameters()):
            p_t.fill_(1.0)
            p_s.fill_(3.0)
    model.momentum_update()
    assert all(torch.allclose(p, torch.full_like(p, 0.9 * 1 + 0.1 * 3)) for p in model.teacher.parameters())
    assert not any(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize('mode', ['gradcam', 'necessity'])
def test_saliency_varies_across_the_words_of_a_caption(albef, mode):
    cfg, model = albef('--saliency', mode)
    batch = shapes_train_batch(6)
    with torch.no_grad():
        image_m = model.teacher.encode_image(batch['image'])
        saliency = model.saliency(batch['input_ids'], batch['attention_mask'], image_m)
    words = model.candidates(batch['input_ids'], batch['attention_mask'])
    assert saliency.shape == batch['input_ids'].shape and saliency.isfinite().all()
    assert all(saliency[b][words[b]].std() > 1e-2 * saliency[b][words[b]].abs().mean() for b in range(6)
               if words[b].sum() > 1)


def test_pruned_patches_keep_the_special_tokens_and_the_highest_scoring_patches():
    image = torch.arange(5.0)[None, :, None].expand(1, 5, 2)          # (1, 1+4, 2): token i holds value i
    scores = torch.tensor([[0.3, 0.0, 0.6, 0.1]])                      # (B, N): patches 1..4
    assert ae.prune_patches(image, scores, 0.5)[0, :, 0].tolist() == [0.0, 3.0, 1.0]
    deit = torch.arange(6.0)[None, :, None].expand(1, 6, 2)           # [CLS], distillation token, 4 patches
    assert ae.prune_patches(deit, scores, 0.25)[0, :, 0].tolist() == [0.0, 1.0, 4.0]


def test_gradcam_is_positive_gradient_times_attention_mean_over_heads_summed_over_patches():
    probs = torch.tensor([[[[0.2, 0.5, 0.3], [0.0, 1.0, 0.0]],          # (B=1, heads=2, L=2, [CLS] + 2 patches)
                           [[0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]]])
    grads = torch.tensor([[[[9.0, 1.0, -2.0], [1.0, 2.0, 3.0]],
                           [[0.0, -1.0, 0.5], [-1.0, -1.0, 4.0]]]])
    # token 0: head 0 -> 0.5 * 1 (+ 0.3 * 0: negative gradient), head 1 -> 0.8 * 0.5; the [CLS] column never counts
    torch.testing.assert_close(ae.gradcam(probs, grads), torch.tensor([[(0.5 + 0.4) / 2, (2.0 + 1.0) / 2]]))
    torch.testing.assert_close(ae.gradcam(probs, grads, n_special=2), torch.tensor([[0.4 / 2, 1.0 / 2]]))
    assert ae.gradcam(probs.bfloat16(), grads.bfloat16()).dtype == torch.float32


def test_gradcam_saliency_of_a_visual_word_depends_on_the_image(albef):
    """The same captions against two different images: the saliency of their visual words changes (the fused [CLS]
    self-attention score used before did not change at all in the first fusion layer)."""
    cfg, model = albef()
    batch = shapes_train_batch(8, stride=5)
    ids, mask = batch['input_ids'], batch['attention_mask']
    visual = torch.isin(ids, data.visual_token_ids(model.tokenizer)) & model.candidates(ids, mask)
    with torch.no_grad():
        image_m = model.teacher.encode_image(batch['image'])
        own = model.saliency(ids, mask, image_m)
        other = model.saliency(ids, mask, image_m.roll(1, 0))
    change = (own - other).abs()[visual] / own[visual].abs().clamp(min=1e-12)
    assert change.median() > 0.05, change


def test_gradcam_needs_a_fusion_layer_below_the_last(albef):
    with pytest.raises(UserError, match='--gradcam_layer 1 must be a fusion layer below the last'):
        ae.check_config(albef('--gradcam_layer', '1')[0])
    ae.check_config(albef('--gradcam_layer', '1', '--saliency', 'necessity')[0])
    _, model = albef('--gradcam_layer', '1', '--saliency', 'necessity')
    model.cfg.saliency, batch = 'gradcam', shapes_train_batch(4)      # what the check prevents: all zeros
    with torch.no_grad():
        image_m = model.teacher.encode_image(batch['image'])
        words = model.candidates(batch['input_ids'], batch['attention_mask'])
        assert (model.saliency(batch['input_ids'], batch['attention_mask'], image_m)[words] == 0).all()


def test_sampled_masking_is_the_top_k_at_temperature_0_and_uniform_at_a_high_one():
    allowed = torch.zeros(4000, 12, dtype=torch.bool)
    allowed[:, 1:11] = True                                   # 10 words -> ceil(3.5) = 4 rewritten
    scores = torch.arange(12.0).expand(4000, 12) * 3.0
    top = ae.top_fraction(scores, allowed, 0.35)
    for temperature in (0.0, 1e-4):
        assert (ae.sample_tokens(scores, allowed, 0.35, temperature) == top).all()
    torch.manual_seed(0)
    uniform = ae.sample_tokens(scores, allowed, 0.35, 1e4).float().mean(0)[1:11]
    assert (uniform - 0.4).abs().max() < 0.035, uniform
    middle = ae.sample_tokens(scores, allowed, 0.35, 1.0)
    frequency = middle.float().mean(0)[1:11]
    assert middle.sum(1).eq(4).all() and not (middle & ~allowed).any()
    assert frequency[-1] > frequency[0] and (middle != top).any(1).float().mean() > 0.5, frequency
    g = lambda: torch.Generator().manual_seed(3)               # a generator makes the draw repeatable
    assert (ae.sample_tokens(scores, allowed, 0.35, 1.0, g()) == ae.sample_tokens(scores, allowed, 0.35, 1.0, g())).all()


def test_e_pitc_ranks_patches_by_the_teacher_vit_cls_attention_whatever_the_caption(albef, monkeypatch):
    cfg, model = albef('--prune_keep', '0.5')
    seen = []
    real = ae.prune_patches
    monkeypatch.setattr(ae, 'prune_patches', lambda embeds, scores, keep: seen.append(scores) or real(embeds, scores, keep))
    context = []
    fuse = model.student.fuse
    monkeypatch.setattr(model.student, 'fuse', lambda text, mask, image, **k: context.append(image.shape) or fuse(text, mask, image, **k))
    batch = shapes_train_batch(8)
    other_captions = dict(batch, input_ids=batch['input_ids'].roll(1, 0), attention_mask=batch['attention_mask'].roll(1, 0))
    model(batch, alpha=0.4, update_teacher=False)
    model(other_captions, alpha=0.4, update_teacher=False)
    torch.testing.assert_close(seen[0], seen[1])              # the captions do not move the ranking
    with torch.no_grad():
        _, vit_attn = model.teacher.visual_encoder(batch['image'], return_attn=True)
    torch.testing.assert_close(seen[0], vit_attn[:, :, 0, 1:].mean(1))
    assert (8, 1 + 32, 128) in context                        # the consistency pass: [CLS] + half of 64 patches


def test_teacher_follows_the_students_train_and_eval_mode(albef):
    _, model = albef()
    assert model.train().teacher.training and not model.eval().teacher.training


@pytest.mark.parametrize('saliency', ['gradcam', 'necessity'])
def test_saliency_reads_the_teacher_in_eval_mode_during_training(albef, saliency):
    """As ALBEF's Grounding.py: with a dropout backbone (bert-base's 0.1) a train-mode teacher would zero part of
    the attention maps and their gradients; the teacher goes back to train mode after."""
    _, model = albef('--saliency', saliency)
    batch, modes = shapes_train_batch(4), []
    hooks = [m.register_forward_pre_hook(lambda m, args: modes.append(m.training)) for m in model.teacher.modules()]
    model.train()
    with torch.no_grad():
        image_m = model.teacher.encode_image(batch['image'])
        modes.clear()
        model.saliency(batch['input_ids'], batch['attention_mask'], image_m)
    for hook in hooks:
        hook.remove()
    assert modes and not any(modes) and model.teacher.training


def test_teacher_takes_one_ema_step_per_optimizer_step_under_grad_accum(albef, tiny_backbones, tmp_path, monkeypatch):
    cfg, model = albef('--momentum', '0.9', '--epic', 'none')
    with torch.no_grad():
        for p_t, p_s in zip(model.teacher.parameters(), model.student.parameters()):
            p_t.fill_(1.0)
            p_s.fill_(3.0)
    model(shapes_train_batch(8), alpha=0.4, update_teacher=False)
    assert all((p == 1).all() for p in model.teacher.parameters())
    model(shapes_train_batch(8), alpha=0.4)                   # (the forward clamps the student's temperature to 0.5)
    assert all(torch.allclose(p_t, 0.9 + 0.1 * p_s) for p_t, p_s in zip(model.teacher.parameters(),
                                                                       model.student.parameters()))
    updates = []
    monkeypatch.setattr(ae.AlbefEpic, 'momentum_update', lambda self: updates.append(1))
    ae.main(AE_TINY + ['--epic', 'none', '--max_steps', '3', '--grad_accum', '2', '--eval_images', '4',
                       '--out_dir', str(tmp_path)])
    assert len(updates) == 3                                  # 6 micro-batches, 3 optimizer steps


def test_one_visual_word_per_caption_is_masked_for_the_modality_gap(tokenizer):
    enc = tokenizer(['a red circle', 'two big blue squares left of a circle', 'a photo of it'], padding=True,
                    return_tensors='pt')
    visual = torch.isin(enc.input_ids, data.visual_token_ids(tokenizer))
    picked = ae.one_visual_word(enc.input_ids, visual, torch.Generator().manual_seed(0))
    assert picked.sum(1).tolist() == [1, 1, 0] and not (picked & ~visual).any()


def test_modality_gap_is_zero_for_a_model_that_ignores_the_image(albef, monkeypatch):
    cfg, model = albef()
    dataset = data.build_dataset(cfg, 'test', data.ShapesWorld(), max_images=6)
    enc = model.tokenizer(dataset.texts, padding=True, return_tensors='pt')
    txt2img = torch.tensor(dataset.txt2img)
    image_embeds = torch.randn(6, 65, 128)
    with torch.no_grad():
        metrics = ae.modality_metrics(model, cfg, enc, image_embeds, txt2img, torch.Generator().manual_seed(0))
        assert set(metrics) == {'mlm_acc', 'mlm_acc_shuffled', 'modality_gap'}
        assert metrics['modality_gap'] == pytest.approx(metrics['mlm_acc'] - metrics['mlm_acc_shuffled'])
        images_seen = []
        fuse = model.student.fuse
        monkeypatch.setattr(model.student, 'fuse', lambda text, mask, image: images_seen.append(image) or fuse(text, mask, None))
        blind = ae.modality_metrics(model, cfg, enc, image_embeds, txt2img, torch.Generator().manual_seed(0))
    assert blind['modality_gap'] == 0 and not torch.equal(images_seen[0], images_seen[1])


def test_epic_losses_train_the_generator_and_the_consistency_head(albef):
    cfg, model = albef('--prune_keep', '0.5')
    losses = model(shapes_train_batch(8), alpha=0.4)
    assert {'ita', 'itm', 'mlm', 'itc', 'gen', 'loss'} <= set(losses)
    torch.testing.assert_close(losses['loss'], losses['ita'] + losses['itm'] + losses['mlm'] + 2 * losses['itc']
                               + losses['gen'])  # the shapes preset's weight
    losses['loss'].backward()
    for part in (model.generator, model.consistency_head, model.student.fusion_layers):
        assert all(p.grad is not None for p in part.parameters())


def test_lambda_itc_weights_the_consistency_loss_and_generator_layers_sets_its_depth(albef):
    cfg, model = albef('--lambda_itc', '0.5', '--generator_layers', '1')
    assert len(model.generator.layers) == 1
    losses = model(shapes_train_batch(8), alpha=0.4)
    torch.testing.assert_close(losses['loss'], losses['ita'] + losses['itm'] + losses['mlm'] + 0.5 * losses['itc']
                               + losses['gen'])


def test_the_shapes_preset_weighs_consistency_at_2_and_the_paper_presets_at_epics_8():
    weight = lambda *argv: common.parse_config(ae.Config, ae.PRESETS, list(argv)).lambda_itc
    assert weight() == 2.0 and weight('--lambda_itc', '8') == 8.0
    assert weight('--data', 'coco') == weight('--data', 'flickr30k') == weight('--data', 'json') == 8.0


def test_albef_epic_trains_under_torch_compile(tiny_backbones, monkeypatch, tmp_path):
    """Grad-CAM differentiates w.r.t. attention maps, and the token draws fail over symbolic shapes: both
    run eagerly inside the compiled step (the run used to stop at its first step). Shapes are dynamic from the
    start, as caption lengths make them in a real run; not inductor's C++ build (minutes here): AOTAutograd's
    graphs without it fail the same way."""
    monkeypatch.setattr(torch, 'compile', partial(torch.compile, backend='aot_eager'))
    monkeypatch.setattr(torch._dynamo.config, 'assume_static_by_default', False)
    ae.main(AE_TINY + ['--compile', 'true', '--max_steps', '2', '--out_dir', str(tmp_path)])
    assert 'itc_auroc' in json.loads((tmp_path / 'metrics.json').read_text())


def test_epic_none_builds_and_trains_no_epic_parameters(albef, tiny_backbones, tmp_path):
    cfg, model = albef('--epic', 'none')
    assert not hasattr(model, 'generator') and not hasattr(model, 'consistency_head')
    ae.main(AE_TINY + ['--epic', 'none', '--max_steps', '1', '--out_dir', str(tmp_path)])
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']
    assert not any(k.startswith(('generator', 'consistency_head')) for k in state)
    assert 'itc_auroc' not in json.loads((tmp_path / 'metrics.json').read_text())


def test_temperature_steps_at_temp_lr_whatever_the_lr(albef):
    cfg, model = albef('--lr', '1e-3', '--temp_lr', '1e-4', '--epic', 'none')
    optimizer = ae.build_optimizer(model, cfg)
    temp_groups = [g for g in optimizer.param_groups if any(p is model.student.temp for p in g['params'])]
    assert len(temp_groups) == 1 and len(temp_groups[0]['params']) == 1 and temp_groups[0]['weight_decay'] == 0
    assert sum(len(g['params']) for g in optimizer.param_groups) == len(list(model.student.parameters()))
    common.set_lr(optimizer, common.lr_at(cfg.warmup_steps, cfg))      # peak of the schedule
    assert temp_groups[0]['lr'] == pytest.approx(1e-4) and optimizer.param_groups[0]['lr'] == pytest.approx(1e-3)
    model.student.temp.grad = torch.ones(())                           # Adam's first step moves by lr
    before = model.student.temp.item()
    optimizer.step()
    assert before - model.student.temp.item() == pytest.approx(1e-4, rel=1e-3)


def test_albef_end_to_end_run_writes_every_output_and_the_metric_keys(tiny_backbones, tmp_path):
    ae.main(AE_TINY + ['--out_dir', str(tmp_path)])
    for name in ('config.json', 'log.jsonl', 'ckpt.pt', 'metrics.json', 'albef_epic.png'):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert {'tr1', 'tr5', 'tr10', 'ir1', 'ir5', 'ir10', 'rmean', 'ita_rmean', 'swap_acc', 'swap_acc_color', 'swap_acc_shape',
            'swap_acc_size', 'swap_acc_position', 'itc_auroc', 'saliency_auroc', 'train_samples_per_s',
            'peak_mem_mb', 'train_seconds', 'mlm_acc', 'mlm_acc_shuffled', 'modality_gap',
            'rewritten_visual_frac'} <= set(metrics)
    rows = read_log(tmp_path)
    assert [r['step'] for r in rows] == [1, 2, 3, 4] and {'ita', 'itm', 'mlm', 'itc', 'gen'} <= set(rows[0])


def test_albef_loss_falls(tiny_backbones, tmp_path):
    ae.main(AE_TINY + ['--out_dir', str(tmp_path), '--max_steps', '40', '--lr', '1e-3', '--eval_images', '4'])
    rows = read_log(tmp_path)
    losses, ita = [r['loss'] for r in rows], [r['ita'] for r in rows]
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8]), losses
    assert np.mean(ita[-8:]) < 0.8 * np.mean(ita[:8]), ita


def test_albef_resumed_run_ends_where_the_uninterrupted_run_does(tiny_backbones, tmp_path, monkeypatch,
                                                                 one_thread):
    argv = AE_TINY + ['--eval_every', '2', '--eval_images', '4']
    ae.main(argv + ['--out_dir', str(tmp_path / 'straight')])
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    resumed = interrupted_then_resumed(ae.main, argv, tmp_path / 'resumed', 2, monkeypatch)
    assert_same_weights(straight['model'], resumed['model'])   # student, teacher and the queues


def test_albef_runs_on_a_coco_format_folder(tiny_backbones, tmp_path):
    make_karpathy_folder(tmp_path / 'coco')
    ae.main(['--data', 'coco', '--data_root', str(tmp_path / 'coco'), '--vision_backbone', 'shapes-tiny-vision',
             '--text_backbone', 'shapes-tiny-text', '--image_size', '64', '--fusion_layers', '2', '--batch_size', '2',
             '--queue_size', '8', '--max_steps', '2', '--k_test', '2', '--embed_dim', '16', '--warmup_steps', '1',
             '--gradcam_layer', '0', '--out_dir', str(tmp_path / 'out')])
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert 'rmean' in metrics and 'swap_acc' not in metrics   # no compositional test on natural images


@pytest.mark.parametrize('argv, message', [
    (['--data', 'coco', '--data_root', '/no/such/folder'], "--data_root '/no/such/folder' is not a folder"),
    (['--epic', 'yes'], "--epic 'yes' is not one of none, random, saliency"),
    (['--queue_size', '30'], '--queue_size 30 must be a multiple of the global batch 8'),
    (['--fusion_layers', '4'], '--fusion_layers 4: the text backbone has 4 layers'),
    (['--mask_temperature', '-1'], '--mask_temperature -1.0 must be >= 0'),
    (['--data', 'coco', '--fusion_layers', '2'], '--gradcam_layer 2 must be a fusion layer below the last, 0 .. 0'),
    (['--text_backbone', 'shapes-tiny-lm'], 'is a qwen2 model, which is not a mlm backbone'),
])
def test_albef_mistakes_get_one_clear_message(tiny_backbones, tmp_path, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        ae.main(AE_TINY + ['--out_dir', str(tmp_path)] + argv)


def test_albef_missing_karpathy_file_names_it(tiny_backbones, tmp_path):
    make_karpathy_folder(tmp_path)
    (tmp_path / 'coco_karpathy_test.json').unlink()
    with pytest.raises(UserError, match='coco_karpathy_test.json is missing'):
        ae.main(AE_TINY + ['--data', 'coco', '--data_root', str(tmp_path), '--out_dir', str(tmp_path / 'out')])


def test_albef_predict_ranks_the_captions_of_each_image_by_itm_with_ita_beside(tiny_backbones, tmp_path, capsys):
    ae.main(AE_TINY + ['--out_dir', str(tmp_path / 'run')])
    ckpt, images = str(tmp_path / 'run' / 'ckpt.pt'), [tmp_path / 'red.png', tmp_path / 'blue.png']
    _save_image(images[0], (200, 30, 30))
    _save_image(images[1], (30, 30, 200))
    predict = lambda *paths: ['--predict', *map(str, paths), '--init_from', ckpt, '--device', 'cpu']
    captions = ['a red circle', 'a blue square']
    capsys.readouterr()
    ae.main(predict(*images) + ['--captions', *captions])   # no training flags: the config is the checkpoint's
    blocks = predicted_blocks(capsys.readouterr().out, images)
    for lines in blocks.values():
        rows = [re.fullmatch(r'  itm (\d\.\d\d)  ita (-?\d\.\d\d)  (.+)', line) for line in lines]
        assert all(rows) and sorted(r[3] for r in rows) == sorted(captions), lines
        itm, ita = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
        assert itm == sorted(itm, reverse=True) and all(0 <= p <= 1 for p in itm) and all(-1 <= s <= 1 for s in ita)
    (tmp_path / 'captions.txt').write_text('a red circle\n\n  a blue square  \n')   # one per line, blanks skipped
    ae.main(predict(*images) + ['--captions', str(tmp_path / 'captions.txt')])
    assert predicted_blocks(capsys.readouterr().out, images) == blocks
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    for argv, message in ((predict(*images), 'pass --captions'),
                          (predict(*images) + ['--captions', str(tmp_path / 'no.txt')], 'no.txt: no such file'),
                          (predict(images[0], tmp_path / 'bad.jpg') + ['--captions', 'a'], 'cannot read')):
        with pytest.raises(UserError, match=re.escape(message)):
            ae.main(argv)


def test_albef_predict_refuses_a_checkpoint_of_another_method(tmp_path):
    model = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'cal', model, torch.optim.SGD(model.parameters(), lr=1), 0,
                           RunConfig())
    with pytest.raises(UserError, match='written by cal, not albef_epic'):
        ae.main(['--predict', str(tmp_path / 'red.png'), '--init_from', str(tmp_path / 'ckpt.pt')])


def test_coco_preset_builds_the_paper_scale_model_on_the_meta_device():
    cfg = common.parse_config(ae.Config, ae.PRESETS, ['--data', 'coco'])
    with torch.device('meta'):  # shapes only: no weights, no download
        model = ae.AlbefEpic(cfg, ViTModel(ViTConfig(image_size=224), add_pooling_layer=False),
                             BertForMaskedLM(BertConfig()), backbones.build_tokenizer())
    albef = backbones.count_params(model.student, trainable_only=True)
    assert 205e6 < albef < 215e6, albef       # ALBEF: ~210M trainable (ViT-B/16 + BERT-base 6+6 with cross-attention)
    assert model.student.visual_encoder.pos_embed.shape == (1, 1 + 16 * 16, 768)   # 256 px -> 16x16 patches
    assert (len(model.student.text_layers), len(model.student.fusion_layers)) == (6, 6)
    assert model.image_queue.shape == (65536, 256)

# ============================================================================= align_two_phase.py

import align_two_phase as a2p

A2P_TINY = ['--stage1_steps', '6', '--max_steps', '4', '--batch_size', '8', '--train_images', '40',
            '--eval_images', '12', '--d_align', '32', '--mrl_dims', '8,16,32', '--mrl_dim_weights', '1,1,1',
            '--max_new_tokens', '5', '--log_every', '1', '--warmup_steps', '2']


def test_clip_loss_on_a_hand_computed_case():
    image, text = torch.eye(2), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # logits = scale * image @ text.T = 2 * [[0.6, 0.0], [0.8, 1.0]]
    rows = -math.log(math.exp(1.2) / (math.exp(1.2) + 1)) - math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0)))
    cols = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6))) - math.log(math.exp(2.0) / (1 + math.exp(2.0)))
    assert a2p.clip_loss(image, text, torch.tensor(2.0)).item() == pytest.approx((rows / 2 + cols / 2) / 2, abs=1e-6)


def test_mrl_loss_with_one_dim_equals_the_clip_loss_of_the_normalised_embeddings():
    image, text, scale = torch.randn(6, 16), torch.randn(6, 16), torch.tensor(10.0)
    expected = a2p.clip_loss(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    torch.testing.assert_close(a2p.mrl_loss(image, text, scale, (16,), (1.0,)), expected)
    nested = a2p.mrl_loss(image, text, scale, (4, 16), (0.5, 2.0))
    first4 = a2p.clip_loss(F.normalize(image[:, :4], dim=-1), F.normalize(text[:, :4], dim=-1), scale)
    torch.testing.assert_close(nested, 0.5 * first4 + 2.0 * expected)


def test_truncated_embeddings_are_renormalised_prefixes():
    x = torch.randn(5, 32) * 3
    t = a2p.truncate(x, 8)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(t * x[:, :8].norm(dim=-1, keepdim=True), x[:, :8])


def test_logit_scale_is_clamped_at_max_scale_and_fixed_without_learn_temp():
    cfg = common.parse_config(a2p.Config, a2p.PRESETS, ['--d_align', '8', '--mrl_dims', '8', '--mrl_dim_weights', '1'])
    aligner = a2p.Aligner(4, 4, cfg)
    assert aligner.log_scale.exp().item() == pytest.approx(1 / 0.07)
    with torch.no_grad():
        aligner.log_scale.fill_(math.log(1000.0))
    aligner.clamp_scale(100.0)
    assert aligner.log_scale.exp().item() == pytest.approx(100.0)
    fixed = a2p.Aligner(4, 4, replace(cfg, learn_temp=False))
    assert 'log_scale' not in dict(fixed.named_parameters()) and 'log_scale' in fixed.state_dict()


@pytest.fixture
def two_phase(tiny_backbones):
    cfg = common.parse_config(a2p.Config, a2p.PRESETS, A2P_TINY[6:])
    model = a2p.TwoPhase(cfg, backbones.load_backbone('shapes-tiny-vision', 'vision'),
                         backbones.load_backbone('shapes-tiny-text', 'text'), backbones.build_tokenizer(),
                         backbones.load_backbone('shapes-tiny-lm', 'lm'), backbones.build_tokenizer())
    return cfg, model


def shapes_batch(n, split='train', start=0):
    world, tokenizer = data.ShapesWorld(), backbones.build_tokenizer()
    items = [data.ShapesCaptions(world, split)[k] for k in range(start, start + n)]
    return dict(data.collate(items, tokenizer, 32))


def test_stage1_gradients_reach_only_the_adapters_and_stage2_only_the_projector(two_phase):
    cfg, model = two_phase
    batch = shapes_batch(4)
    a2p.stage1_loss(model, model.aligner, batch, replace(cfg, cache_features=False))['loss'].backward()
    with_grad = {n.split('.')[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {'aligner'}
    model.zero_grad(set_to_none=True)
    model.aligner.requires_grad_(False)
    a2p.stage2_loss(model, model.captioner, batch, replace(cfg, cache_features=False))['loss'].backward()
    with_grad = {'.'.join(n.split('.')[:2]) for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {'captioner.projector'}


def test_stage2_labels_are_on_caption_and_eos_only():
    tokenizer = backbones.build_tokenizer()
    ids, mask, labels = a2p.lm_batch(tokenizer, 'describe this image :', ['a red circle', 'a large blue square'],
                                     eos_id=3, pad_id=0, n_prefix=4, max_len=32)
    prompt = tokenizer('describe this image :', add_special_tokens=False).input_ids          # 4 tokens
    assert ids.shape == (2, 4 + 4 + 1) and mask.shape == labels.shape == (2, 4 + 9)
    assert (labels[:, :4 + 4] == -100).all()                                                  # prefix + prompt
    assert labels[0, 8:].tolist() == tokenizer('a red circle', add_special_tokens=False).input_ids + [3, -100]
    assert labels[1, 8:].tolist() == tokenizer('a large blue square', add_special_tokens=False).input_ids + [3]
    assert ids[0].tolist() == prompt + labels[0, 8:11].tolist() + [3, 0]                      # right padding
    assert mask[0].tolist() == [1] * 12 + [0] and mask[1].tolist() == [1] * 13


def greedy_by_hand(captioner, z, prompt, steps):
    """One image at a time, no padding, argmax of the LLM's last logits fed back: the reference for generate."""
    ids = captioner.tokenizer(prompt, add_special_tokens=False, return_tensors='pt').input_ids
    x = torch.cat([captioner.projector(z[None]), captioner.lm.get_input_embeddings()(ids)], 1)
    new = []
    for _ in range(steps):
        token = captioner.lm(inputs_embeds=x).logits[0, -1].argmax().item()
        if token == captioner.eos_id:
            break
        new.append(token)
        x = torch.cat([x, captioner.lm.get_input_embeddings()(torch.tensor([[token]]))], 1)
    return ' '.join(captioner.tokenizer.decode(new, skip_special_tokens=True).split())


def test_generate_returns_only_new_text_and_batched_left_padding_equals_one_by_one(two_phase):
    cfg, model = two_phase
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.captioner.projector.linear.weight.normal_(0, 2.0)  # a prefix that changes what the LLM says
    z = F.normalize(torch.randn(3, cfg.d_align), dim=-1)
    prompts = ['describe this image :', 'a picture of', 'question : what color is the circle ? answer :']
    batched = model.captioner.generate(z, prompts)
    with torch.no_grad():
        alone = [greedy_by_hand(model.captioner, z[b], prompts[b], cfg.max_new_tokens) for b in range(3)]
    assert batched == alone
    assert len(set(batched)) > 1


def test_end_to_end_run_writes_every_output_and_the_metric_keys(tiny_backbones, tmp_path):
    a2p.main(A2P_TINY + ['--out_dir', str(tmp_path)])
    for name in ('config.json', 'log.jsonl', 'ckpt.pt', 'metrics.json', 'align_two_phase.png'):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    recall = ('tr1', 'tr5', 'tr10', 'ir1', 'ir5', 'ir10', 'rmean')
    assert {f'd{m}_{k}' for m in (8, 16, 32) for k in recall} | set(recall) <= set(metrics)
    assert {'swap_acc', 'swap_acc_color', 'swap_acc_shape', 'swap_acc_size', 'swap_acc_position', 'bleu4', 'rouge_l',
            'cider', 'blind_cider', 'train_samples_per_s', 'peak_mem_mb', 'train_seconds', 'cache_seconds',
            'stage1_train_seconds', 'stage2_train_seconds'} <= set(metrics)
    assert [r['step'] for r in read_log(tmp_path)] == list(range(1, 11))
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert state['method'] == 'align_two_phase' and state['stage'] == 2 and state['step'] == 10
    assert not any(k.startswith(('vision', 'text', 'lm')) for k in state['model'])  # frozen towers are not saved
    assert state['model']['aligner.image_center'].abs().sum() > 0   # adapters see centred features


def test_stage1_loss_falls(tiny_backbones, tmp_path):
    a2p.main(A2P_TINY + ['--out_dir', str(tmp_path), '--stage', '1', '--stage1_steps', '60', '--batch_size', '32',
                         '--stage1_lr', '3e-3'])
    losses = [r['loss'] for r in read_log(tmp_path)]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


def test_stage2_alone_starts_from_a_stage1_checkpoint_and_keeps_its_adapters(tiny_backbones, tmp_path):
    a2p.main(A2P_TINY + ['--out_dir', str(tmp_path / 'p1'), '--stage', '1'])
    a2p.main(A2P_TINY + ['--out_dir', str(tmp_path / 'p2'), '--stage', '2', '--init_from', str(tmp_path / 'p1' / 'ckpt.pt')])
    p1, p2 = (torch.load(tmp_path / run / 'ckpt.pt', weights_only=True) for run in ('p1', 'p2'))
    assert (p1['stage'], p2['stage'], p2['step']) == (1, 2, 4)
    assert_same_weights({k: v for k, v in p1['model'].items() if k.startswith('aligner')},
                        {k: v for k, v in p2['model'].items() if k.startswith('aligner')}, atol=0)
    assert not torch.equal(p1['model']['projector.linear.weight'], p2['model']['projector.linear.weight'])
    assert 'cider' in json.loads((tmp_path / 'p2' / 'metrics.json').read_text())


def test_cached_features_train_the_same_adapters_as_on_the_fly_encoding(tiny_backbones, tmp_path):
    argv = A2P_TINY + ['--stage', '1', '--adapter_dropout', '0.1']
    a2p.main(argv + ['--out_dir', str(tmp_path / 'cached'), '--cache_features', 'true'])
    a2p.main(argv + ['--out_dir', str(tmp_path / 'live'), '--cache_features', 'false'])
    cached, live = (torch.load(tmp_path / run / 'ckpt.pt', weights_only=True)['model'] for run in ('cached', 'live'))
    assert_same_weights(cached, live, atol=1e-5)


def test_resumed_run_ends_where_the_uninterrupted_run_does(tiny_backbones, tmp_path, monkeypatch, one_thread):
    argv = A2P_TINY + ['--eval_every', '3']  # checkpoints at steps 3, 6 (end of stage 1), 9 and 10
    a2p.main(argv + ['--out_dir', str(tmp_path / 'straight')])
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    for stop_at in (3, 6, 9):  # in stage 1, at its end, and in stage 2
        resumed = interrupted_then_resumed(a2p.main, argv, tmp_path / f'resumed{stop_at}', stop_at, monkeypatch)
        assert_same_weights(straight['model'], resumed['model'])


def test_resume_at_the_stage_boundary_gives_stage_2_the_random_state_of_a_straight_run(tiny_backbones, tmp_path,
                                                                                       monkeypatch):
    straight = rng_at_each_call(a2p, 'stage2_loss', monkeypatch,
                                lambda: a2p.main(A2P_TINY + ['--out_dir', str(tmp_path / 'straight')]))
    resumed = rng_at_each_call(a2p, 'stage2_loss', monkeypatch, lambda: interrupted_then_resumed(
        a2p.main, A2P_TINY, tmp_path / 'resumed', 6, monkeypatch))  # killed at the end of stage 1 (6 steps)
    assert len(straight) == len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


@pytest.mark.parametrize('argv, message', [
    (['--stage', '2'], '--stage 2 starts from a stage-1 model: pass --init_from'),
    (['--mrl_dims', '16,8'], '--mrl_dims 16,8 must rise strictly'),
    (['--mrl_dim_weights', '1,1'], '--mrl_dim_weights has 2 values for 3 --mrl_dims'),
    (['--projector', 'lstm'], "--projector 'lstm' is not one of mlp, transformer"),
    (['--lm_backbone', 'no-such-org/no-such-lm'], "unknown backbone 'no-such-org/no-such-lm'"),
])
def test_align_two_phase_mistakes_get_one_clear_message(tiny_backbones, tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        a2p.main(A2P_TINY + ['--out_dir', str(tmp_path)] + argv)


def test_align_two_phase_refuses_a_checkpoint_of_another_method(tiny_backbones, tmp_path):
    model = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'cal', model, torch.optim.SGD(model.parameters(), lr=1), 0,
                           RunConfig())
    with pytest.raises(UserError, match='written by cal, not align_two_phase'):
        a2p.main(A2P_TINY + ['--out_dir', str(tmp_path), '--eval_only', 'true'])


def test_align_two_phase_names_a_checkpoint_that_does_not_say_its_stage(tiny_backbones, tmp_path):
    a2p.main(A2P_TINY + ['--out_dir', str(tmp_path), '--stage', '1'])
    state = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    state['phase'] = state.pop('stage')  # as the file was written before the rename
    torch.save(state, tmp_path / 'ckpt.pt')
    with pytest.raises(UserError, match="does not say which stage wrote it"):
        a2p.main(A2P_TINY + ['--out_dir', str(tmp_path), '--eval_only', 'true'])


def test_align_two_phase_predict_captions_each_image_and_ranks_the_captions_by_cosine(tiny_backbones, tmp_path,
                                                                                       capsys):
    a2p.main(A2P_TINY + ['--out_dir', str(tmp_path / 'run')])
    ckpt, images = tmp_path / 'run' / 'ckpt.pt', [tmp_path / 'red.png', tmp_path / 'blue.png']
    _save_image(images[0], (200, 30, 30))
    _save_image(images[1], (30, 30, 200))
    predict = lambda ckpt, *paths: ['--predict', *map(str, paths), '--init_from', str(ckpt), '--device', 'cpu']
    captions = ['a red circle', 'a blue square']
    capsys.readouterr()
    a2p.main(predict(ckpt, *images) + ['--captions', *captions])   # no training flags: the checkpoint's config
    blocks = predicted_blocks(capsys.readouterr().out, images)
    for lines in blocks.values():   # stage 2 trained: the greedy caption, then the ranked captions
        assert re.fullmatch(r'  caption: .*', lines[0]), lines
        rows = [re.fullmatch(r'  cos (-?\d\.\d\d)  (.+)', line) for line in lines[1:]]
        assert all(rows) and sorted(r[2] for r in rows) == sorted(captions), lines
        cosine = [float(r[1]) for r in rows]
        assert cosine == sorted(cosine, reverse=True) and all(-1 <= c <= 1 for c in cosine)
    a2p.main(predict(ckpt, *images))   # without --captions: the caption alone
    assert predicted_blocks(capsys.readouterr().out, images) == {p: lines[:1] for p, lines in blocks.items()}
    state = torch.load(ckpt, weights_only=True)
    torch.save(dict(state, stage=1), tmp_path / 'stage1.pt')   # as if stage 1 had just ended: no captioner
    a2p.main(predict(tmp_path / 'stage1.pt', *images) + ['--captions', *captions])
    assert predicted_blocks(capsys.readouterr().out, images) == {p: lines[1:] for p, lines in blocks.items()}
    (tmp_path / 'bad.jpg').write_bytes(b'not an image')
    for argv, message in ((predict(tmp_path / 'stage1.pt', *images), 'finished stage 1 only'),
                          (predict(ckpt, images[0], tmp_path / 'bad.jpg'), 'cannot read')):
        with pytest.raises(UserError, match=message):
            a2p.main(argv)


def test_align_two_phase_predict_refuses_a_checkpoint_of_another_method(tmp_path):
    model = torch.nn.Linear(2, 2)
    common.save_checkpoint(tmp_path / 'ckpt.pt', 'cal', model, torch.optim.SGD(model.parameters(), lr=1), 0,
                           RunConfig())
    with pytest.raises(UserError, match='written by cal, not align_two_phase'):
        a2p.main(['--predict', str(tmp_path / 'red.png'), '--init_from', str(tmp_path / 'ckpt.pt')])


A2P_DDP_SCRIPT = '''
import sys, torch
sys.path.insert(0, {repo!r})
import common, align_two_phase as a2p
cfg = common.parse_config(a2p.Config, a2p.PRESETS, ['--out_dir', {out!r}, '--device', 'cpu', '--d_align', '16',
                          '--mrl_dims', '4,16', '--mrl_dim_weights', '1,1', '--adapter_dropout', '0'])
run = common.setup(cfg)
aligner = a2p.Aligner(12, 10, cfg)                 # the same init on every rank (same seed)
g = torch.Generator().manual_seed(1)
image, text = torch.randn(8, 12, generator=g), torch.randn(8, 10, generator=g)   # the global batch of cached features
mine = slice(4 * run.rank, 4 * run.rank + 4) if run.distributed else slice(0, 8)
ddp = common.wrap_ddp(aligner, run)                # kept alive until backward: its hooks average the gradients
loss = a2p.stage1_loss(None, ddp, dict(image=image[mine], text=text[mine]), cfg)['loss']
loss.backward()
if run.is_main:
    torch.save({{n: p.grad for n, p in aligner.named_parameters()}}, {out!r} + '/grads_%d.pt' % run.world_size)
del ddp, loss                                      # DDP's reducer goes before the process group,
common.teardown(run)                               # which goes before exit (else gloo threads can abort a rank)
'''


def test_two_ranks_of_batch_b_give_the_adapter_gradients_of_one_process_of_batch_2b(tmp_path):
    script = tmp_path / 'ddp.py'
    script.write_text(A2P_DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for launcher in (['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'], []):
        proc = subprocess.run([sys.executable, *launcher, str(script)], capture_output=True, text=True, timeout=300,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    two, one = (torch.load(tmp_path / f'grads_{n}.pt') for n in (2, 1))
    assert one['image_adapter.net.1.weight'].abs().sum() > 0
    assert_same_weights(two, one)

# ============================================================================= blip_gated_sparse.py

import blip_gated_sparse as bgs

BGS_TINY = ['--max_steps', '4', '--batch_size', '4', '--eval_images', '6', '--val_images', '4', '--log_every', '1',
            '--warmup_steps', '1', '--max_new_tokens', '6', '--min_new_tokens', '2', '--eval_every', '2']


def test_blip_shapes_preset_trains_1000_steps_with_a_val_eval_every_100():
    """1,000 steps keep a first run, backbone builds included, under 10 minutes on 2 cores (README); the val curve
    keeps its resolution of 100 steps, which steps_to_90_cider / steps_to_95_cider read."""
    cfg = parse_config(bgs.Config, bgs.PRESETS, [], stem='blip_gated_sparse')
    assert (cfg.max_steps, cfg.eval_every, cfg.batch_size) == (1000, 100, 64)
    assert parse_config(bgs.Config, bgs.PRESETS, ['--data', 'coco'], stem='blip_gated_sparse').max_steps == 11_000


def blip(tiny_backbones, *argv):
    cfg = parse_config(bgs.Config, bgs.PRESETS, list(argv), stem='blip_gated_sparse')
    tokenizer = bgs.decoder_tokenizer(cfg.text_backbone)
    vision = backbones.load_backbone(cfg.vision_backbone, 'vision') if cfg.image_input == 'pixels' else None
    torch.manual_seed(0)
    return bgs.Captioner(cfg, tokenizer, vision, backbones.load_backbone(cfg.text_backbone, 'mlm')).eval()


def perturb_gates(model, seed=1):
    """Gates away from their identity initialisation, so that tests see them act."""
    torch.manual_seed(seed)
    for gate in model.decoder.gates:
        torch.nn.init.normal_(gate.w2.weight, std=1.0)
        torch.nn.init.normal_(gate.w2.bias, std=0.5)


def test_topk_edits_the_masked_scores_before_the_softmax():
    torch.manual_seed(0)
    attn = bgs.GatedSparseAttention(16, 2).eval()
    x = torch.randn(1, 4, 16)

    def only_first_key(scores, mask):  # (B, H, Lq, Lk)
        assert mask.shape == (1, 1, 1, 4)
        return scores.index_fill(-1, torch.arange(1, 4), torch.finfo(scores.dtype).min)

    attn.topk = only_first_key
    out, probs, _ = attn(x, mask=padding_mask(torch.ones(1, 4)), return_attn=True)
    assert torch.allclose(probs[..., 0], torch.ones(1, 2, 4))
    v = attn.v(x)[:, :1]  # every query sees only key 0, so every output is proj(v_0)
    assert torch.allclose(out, attn.proj(v).expand(1, 4, 16), atol=1e-6)


def test_topk_keeps_ceil_of_the_kept_fraction_of_visible_keys_and_never_a_future_or_padded_one():
    torch.manual_seed(0)
    B, H, L = 3, 2, 9
    lengths = torch.tensor([9, 6, 1])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    attn_mask = padding_mask(mask) + causal_mask(L)                              # (B, 1, L, L)
    attention = bgs.GatedSparseAttention(16, H)
    for sparsity in (0.5, 0.7, 0.9):
        attention.topk = bgs.TopK(sparsity)
        _, probs, _ = attention(torch.randn(B, L, 16), mask=attn_mask, return_attn=True)
        for b in range(B):
            for i in range(L):
                visible = min(i + 1, int(lengths[b]))
                kept = (probs[b, :, i] > 0).sum(-1)                             # (H,) per head
                assert (kept == max(1, math.ceil(round((1 - sparsity) * visible, 9)))).all(), (sparsity, b, i)
                assert (probs[b, :, i, i + 1:] == 0).all() and (probs[b, :, i, int(lengths[b]):] == 0).all()


def test_topk_is_exact_on_a_hand_case_with_a_tie_and_counts_kept_connections():
    topk = bgs.TopK(0.5)
    scores = torch.tensor([[[[3.0, 1.0, 2.0, 2.0, 0.0]]]])                      # 5 visible keys: k = 3
    low = torch.finfo(torch.float32).min
    assert topk(scores, None).tolist() == [[[[3.0, low, 2.0, 2.0, low]]]]
    assert (topk.kept, topk.visible) == (0, 0)                                   # counting is off in training
    topk.counting, topk.query_mask = True, torch.ones(1, 1)
    mask = torch.tensor([0.0, 0.0, low, low, low])                               # 2 visible keys: k = 1
    assert topk(scores + mask, mask).tolist() == [[[[3.0, low, low, low, low]]]]
    assert (topk.kept, topk.visible) == (1, 2)
    topk.sparsity = 0.6                                                          # k = 2: a tie at the 2nd score
    assert topk(scores, None).tolist() == [[[[3.0, low, 2.0, 2.0, low]]]]        # both tied keys stay
    assert (topk.kept, topk.visible) == (4, 7)


def test_topk_threshold_from_a_partial_sort_keeps_the_full_sort_kept_set_ties_included():
    def full_sort(scores, mask, sparsity):  # the threshold from a full descending sort of each row
        visible = (torch.ones_like(scores, dtype=torch.bool) if mask is None
                   else (mask > torch.finfo(mask.dtype).min / 2).expand_as(scores))
        n = visible.sum(-1, keepdim=True)
        k = ((1 - sparsity) * n.double() * 1e9).round().div(1e9).ceil().clamp(min=1).long()
        ranked = scores.masked_fill(~visible, -math.inf).sort(-1, descending=True).values
        return visible & (scores >= ranked.gather(-1, k - 1))

    torch.manual_seed(0)
    low = torch.finfo(torch.float32).min
    for sparsity in (0.3, 0.5, 0.7, 0.9):
        topk = bgs.TopK(sparsity)
        for L, Lk in ((7, 7), (5, 65)):
            scores = torch.randint(-3, 4, (3, 2, L, Lk)).float()                # many ties
            lengths = torch.tensor([Lk, Lk // 2, 1])
            keys = (torch.arange(Lk)[None] < lengths[:, None]).long()
            masks = [None, padding_mask(keys)] + ([padding_mask(keys) + causal_mask(L)] if L == Lk else [])
            for mask in masks:
                masked = scores if mask is None else scores + mask.clamp(min=low)
                kept = topk(masked, mask) > low / 2
                assert torch.equal(kept, full_sort(masked, mask, sparsity)), (sparsity, L, mask is None)


def test_gate_as_soft_mask_lowers_that_keys_weight_in_every_row_whatever_the_sign_of_its_score():
    torch.manual_seed(0)
    B, H, L, j = 2, 2, 6, 1
    attention = bgs.GatedSparseAttention(16, H).eval()
    x, mask = torch.randn(B, L, 16), causal_mask(L)[None, None]
    q, k = (attention.q(x).view(B, L, H, -1).transpose(1, 2), attention.k(x).view(B, L, H, -1).transpose(1, 2))
    scores = (q @ k.transpose(-2, -1))[:, :, j:, j]                             # key j, the rows that see it
    assert (scores < 0).any() and (scores > 0).any()                           # both signs
    gate = torch.ones(B, L)
    _, before, _ = attention(x, mask=mask, gate=gate, return_attn=True)
    _, plain, _ = attention(x, mask=mask, return_attn=True)
    assert torch.equal(before, plain)                                            # g = 1: no change at all
    gate[:, j] = 0.3
    _, after, _ = attention(x, mask=mask, gate=gate, return_attn=True)
    assert (after[:, :, j:, j] < before[:, :, j:, j]).all()                     # every row hears key j less
    weight = before[:, :, j:, j] * 0.3 / (1 - 0.7 * before[:, :, j:, j])         # g_j exp(s_ij) / sum
    assert torch.allclose(after[:, :, j:, j], weight, atol=1e-6)


def test_attn_kept_frac_counts_the_rows_of_real_tokens_only():
    topk = bgs.TopK(0.5)
    topk.counting, topk.query_mask = True, torch.tensor([[1, 1, 1, 0]])          # the 4th token is padding
    L = 4
    mask = padding_mask(topk.query_mask) + causal_mask(L)                        # (1, 1, 4, 4)
    topk(torch.randn(1, 1, L, L) + mask, mask)
    # query i sees min(i + 1, 3) real keys and keeps ceil(half): 1 + 1 + 2 of 1 + 2 + 3; the pad's row is left out
    assert (topk.kept, topk.visible) == (4, 6)


def test_bench_times_its_rows_in_interleaved_rounds_and_prints_each_against_the_first(tiny_backbones, capsys):
    import bench
    calls = []
    seconds = bench.interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, rounds=3, warmup=1)
    assert calls == ['a', 'b'] + ['a', 'b'] * 3 and set(seconds) == {'a', 'b'}  # warm-up, then turns
    bench.main(['blip', '--rounds', '1'])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert [line.split(' | ')[0][2:] for line in table[1:]] == list(bench.BLIP_ROWS)
    assert table[1].endswith('| 1.000x |')


def test_bench_albef_times_the_five_ablation_rows_and_epitc_the_pruned_consistency_pass(tiny_backbones, capsys):
    import bench
    bench.main(['albef', '--rounds', '1'])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert [line.split(' | ')[0][2:] for line in table[1:]] == list(bench.ALBEF_ROWS)
    bench.main(['epitc', '--rounds', '1', '--image_sizes', '64'])
    rows = [line.split(' | ') for line in capsys.readouterr().out.splitlines() if line.startswith('| ')][1:]
    assert [row[0][2:] for row in rows] == ['consistency pass, 64 of 64 patches', 'consistency pass, 32 of 64 patches',
                                            'training step, --prune_keep 1', 'training step, --prune_keep 0.5']
    assert rows[0][2] == rows[2][2] == '1.000x |' and float(rows[1][1]) > 0


def test_bench_against_hf_prints_a_ratio_for_each_module_and_the_captioner(capsys):
    import bench
    bench.main(['hf', '--sizes', 'tiny', '--rounds', '1'])
    rows = [line.split(' | ') for line in capsys.readouterr().out.splitlines() if line.startswith('| tiny ')]
    assert [row[1] for row in rows] == ['vision tower fwd+bwd', 'text encoder fwd+bwd',
                                        'captioning step, gate off, sparsity 0',
                                        'captioning step, gate kv + sparsity 0.7', 'beam search (3 beams, 16 tokens)']
    assert all(float(row[5].rstrip(' |')) > 0 for row in rows)


def test_steps_to_a_fraction_of_the_best_val_cider_read_from_the_log(tmp_path):
    rows = [dict(step=10, loss=2.0), dict(step=10, val_cider=40.0), dict(step=20, val_cider=92.0),
            dict(step=30, val_cider=100.0), dict(step=40, val_cider=97.0)]
    (tmp_path / 'log.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
    assert bgs.steps_to_fraction(tmp_path / 'log.jsonl', 0.9) == 20
    assert bgs.steps_to_fraction(tmp_path / 'log.jsonl', 0.95) == 30
    (tmp_path / 'log.jsonl').write_text(json.dumps(dict(step=10, loss=2.0)))
    assert bgs.steps_to_fraction(tmp_path / 'log.jsonl', 0.9) is None


def test_sparse_attention_changes_the_decoder_output_and_the_loss(tiny_backbones):
    dense, sparse = blip(tiny_backbones, '--sparsity', '0'), blip(tiny_backbones, '--sparsity', '0.7')
    ids, mask, labels = dense.tokenize(['a small red circle', 'there is a blue square at the top left'])
    images = torch.randn(2, 3, 64, 64)
    assert dense.decoder.layers[0].self_attn.topk is None
    assert sparse.decoder.layers[0].self_attn.topk is sparse.decoder.layers[0].cross_attn.topk
    with torch.no_grad():
        a = dense.decoder(ids, dense.encode_image(images), mask)
        b = sparse.decoder(ids, sparse.encode_image(images), mask)
        assert not torch.allclose(a, b, atol=1e-3)
        assert dense(images, ids, mask, labels) != sparse(images, ids, mask, labels)
    only_cross = blip(tiny_backbones, '--sparse_in', 'cross')
    assert only_cross.decoder.layers[0].self_attn.topk is None
    assert only_cross.decoder.layers[0].cross_attn.topk is only_cross.decoder.topk


@pytest.mark.parametrize('gate', ['kv', 'hidden'])
def test_gated_decoder_equals_the_ungated_one_exactly_at_initialisation(tiny_backbones, gate):
    plain, gated = blip(tiny_backbones, '--gate', 'off'), blip(tiny_backbones, '--gate', gate)
    gated.load_state_dict(plain.state_dict(), strict=False)                     # same weights, gates at identity
    ids, mask, _ = plain.tokenize(['a small red circle', 'there is a blue square at the top left'])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = plain.decoder(ids, plain.encode_image(images), mask)
        b = gated.decoder(ids, gated.encode_image(images), mask)
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    assert all(torch.equal(g, mask.float()) for g in gated.decoder.last_gates)  # g = 1 on tokens, 0 on pads
    perturb_gates(gated)
    with torch.no_grad():
        c = gated.decoder(ids, gated.encode_image(images), mask)
    assert not torch.allclose(a[mask.bool()], c[mask.bool()], atol=1e-3)       # and the gate acts once trained


@pytest.mark.parametrize('gate', ['kv', 'hidden'])
def test_gate_parameters_receive_gradient(tiny_backbones, gate):
    model = blip(tiny_backbones, '--gate', gate).train()
    ids, mask, labels = model.tokenize(['a small red circle', 'a blue square'])
    model(torch.randn(2, 3, 64, 64), ids, mask, labels).backward()
    for gate_module in model.decoder.gates:
        weight_grad, bias_grad = gate_module.w2.weight.grad.abs().sum(), gate_module.w2.bias.grad.abs()
        assert weight_grad > 0
        if gate == 'kv':  # a soft mask: log g shifted alike on every key cancels in the softmax
            assert bias_grad < 1e-5 * weight_grad
        else:
            assert bias_grad > 0


def test_prompt_bos_and_pad_labels_are_minus_100_and_the_caption_and_sep_are_learned(tiny_backbones):
    model = blip(tiny_backbones)
    tok = model.tokenizer
    ids, mask, labels = model.tokenize(['a red circle', 'there is a large blue square at the top'])
    assert model.n_prompt == 4                                                   # [DEC] a picture of
    assert (ids[:, 0] == tok.bos_token_id).all() and tok.bos_token == '[DEC]'
    assert tok.convert_ids_to_tokens(ids[0, :model.n_prompt].tolist()) == ['[DEC]', 'a', 'picture', 'of']
    assert (labels[:, :4] == -100).all() and (labels[mask == 0] == -100).all()
    assert labels[0, 4:8].tolist() == ids[0, 4:8].tolist() and ids[0, 7] == tok.sep_token_id
    assert (labels[0, 8:] == -100).all() and (mask[0, 8:] == 0).all()


@pytest.mark.parametrize('gate, sparse_in', [('kv', 'self,cross'), ('hidden', 'self'), ('off', 'cross')])
def test_cached_step_by_step_decoding_gives_the_teacher_forced_logits_with_sparsity_on(tiny_backbones, gate,
                                                                                      sparse_in):
    model = blip(tiny_backbones, '--gate', gate, '--sparsity', '0.7', '--sparse_in', sparse_in)
    if model.decoder.gates is not None:
        perturb_gates(model)
    ids, _, _ = model.tokenize(['there is a large blue square at the top left', 'a small red circle above a cross'])
    ids = ids[:, :10]                                                            # no padding in either row
    image = model.encode_image(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        full = model.decoder(ids, image)                                         # (2, 10, V)
        cache = []
        steps = [model.decoder(ids[:, :4], image, cache=cache)]                  # the prompt at once, then one by one
        steps += [model.decoder(ids[:, t:t + 1], image, cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache[0][0].shape[2] == 10


def greedy_blip_by_hand(model, image, steps):
    """Greedy decoding without a cache: the whole sequence again at every step."""
    ids = model.tokenize([''])[0][:, :model.n_prompt].expand(len(image), -1)
    for t in range(steps):
        logits = model.decoder(ids, image)[:, -1]
        if t < model.cfg.min_new_tokens:
            logits[:, model.eos_id] = -math.inf
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[:, model.n_prompt:]


def test_greedy_generation_equals_decoding_by_hand_and_beam_search_with_the_cache_equals_it_without(
        tiny_backbones):
    model = blip(tiny_backbones, '--max_new_tokens', '8', '--min_new_tokens', '2', '--sparsity', '0.5')
    perturb_gates(model, seed=3)                                                 # a draw whose captions vary
    torch.nn.init.normal_(model.decoder.lm_head.dense.weight, std=0.2)          # the few-step backbone says 'a'
    image = model.encode_image(torch.randn(16, 3, 64, 64))
    with torch.no_grad():
        by_hand = greedy_blip_by_hand(model, image, 8)
        greedy = [model.tokenizer.decode(r[:(r == model.eos_id).nonzero()[0, 0] if (r == model.eos_id).any() else 8],
                                         skip_special_tokens=True) for r in by_hand]
        assert model.generate(image, num_beams=1) == greedy
        beams = model.generate(image, num_beams=4)                               # reorders the cache every step
        assert beams == model.generate(image, num_beams=4, kv_cache=False)
    assert len({len(c.split()) for c in beams}) > 1 and len(set(' '.join(beams).split())) >= 3, beams  # varied


def test_beam_search_with_the_cache_gives_the_step_logits_of_no_cache_and_projects_the_image_once_per_generate(
        tiny_backbones):
    model = blip(tiny_backbones, '--max_new_tokens', '8', '--min_new_tokens', '2', '--sparsity', '0.5')
    perturb_gates(model, seed=3)                                                 # gate kv and top-k on
    torch.nn.init.normal_(model.decoder.lm_head.dense.weight, std=0.2)          # the few-step backbone says 'a'
    image = model.encode_image(torch.randn(5, 3, 64, 64))
    logits, k_calls = [], []                                                     # per decoder call
    model.decoder.register_forward_hook(lambda module, args, out: logits.append(out[:, -1]))
    for layer in model.decoder.layers:
        layer.cross_attn.k.register_forward_hook(lambda *_: k_calls.append(1))
    with torch.no_grad():
        for beams in (2, 3, 5):
            runs = {}
            for kv_cache in (True, False):
                logits.clear(), k_calls.clear()
                runs[kv_cache] = model.generate(image, num_beams=beams, kv_cache=kv_cache), list(logits), len(k_calls)
            (cached, cached_logits, cached_k), (plain, plain_logits, plain_k) = runs[True], runs[False]
            assert cached == plain and len(set(cached)) > 1, cached
            assert len(cached_logits) == len(plain_logits) > 2                   # the prompt, then each step
            for a, b in zip(cached_logits, plain_logits):                        # (5 * beams, V) each
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            n_layers = len(model.decoder.layers)
            assert cached_k == n_layers                                          # once per generate(), not per step
            assert plain_k == n_layers * len(plain_logits)


def test_latent_encoder_takes_any_grid_and_names_a_bad_latent_shape():
    encoder = bgs.LatentEncoder(dim=16, depth=1, heads=2)
    for h, w, tokens in ((8, 8, 16), (6, 10, 15), (5, 7, 12)):
        assert encoder(torch.randn(2, 4, h, w)).shape == (2, tokens, 16)
    pos = bgs.sincos_2d(2, 3, 16)
    assert pos.shape == (6, 16) and len({tuple(p.tolist()) for p in pos}) == 6  # each cell its own position
    for shape in ((2, 3, 8, 8), (2, 4, 8), (2, 4, 8, 8, 1)):
        with pytest.raises(UserError, match=r'latent input must be \(batch, 4, h, w\) VAE latents'):
            encoder(torch.randn(*shape))


def test_blip_runs_on_latent_files_named_by_a_caption_json_with_any_grid(tiny_backbones, tmp_path):
    rows = []
    for i in range(6):
        np.save(tmp_path / f'{i}.npy', np.random.RandomState(i).randn(4, 6, 10).astype(np.float32))
        rows.append(dict(latent=f'{i}.npy', caption=['a red circle', 'a blue square'][i % 2]))
    for split in data.SPLITS:  # one file per split, the same rows in each
        (tmp_path / f'caps_{split}.json').write_text(json.dumps(rows))
    bgs.main(BGS_TINY + ['--data', 'json', '--ann_file', str(tmp_path / 'caps_{split}.json'), '--image_input', 'latents',
                         '--text_backbone', 'shapes-tiny-text', '--max_len', '16', '--out_dir', str(tmp_path / 'out')])
    metrics = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert 'cider' in metrics and (tmp_path / 'out' / 'blip_gated_sparse.png').is_file()
    for split in data.SPLITS:
        (tmp_path / f'bad_{split}.json').write_text(json.dumps([dict(latent='bad.npy', caption='a red circle')] * 4))
    np.save(tmp_path / 'bad.npy', np.zeros((3, 6, 10), np.float32))
    with pytest.raises(UserError, match=r'latent input must be \(batch, 4, h, w\).*got a tensor of shape \(4, 3, 6'):
        bgs.main(BGS_TINY + ['--data', 'json', '--ann_file', str(tmp_path / 'bad_{split}.json'), '--image_input', 'latents',
                             '--text_backbone', 'shapes-tiny-text', '--out_dir', str(tmp_path / 'bad')])


def test_blip_trains_resumes_and_evaluates_on_latents_in_three_grids(tiny_backbones, tmp_path, monkeypatch):
    rows = []
    for i in range(12):  # 4 images per grid, interleaved: 3 batches of 4 an epoch, each of one grid
        np.save(tmp_path / f'{i}.npy', np.random.RandomState(i).randn(*GRIDS[i % 3]).astype(np.float32))
        rows.append(dict(latent=f'{i}.npy', caption=['a red circle', 'a blue square'][i % 2]))
    for split in data.SPLITS:  # one file per split, the same rows in each
        (tmp_path / f'caps_{split}.json').write_text(json.dumps(rows))
    argv = BGS_TINY + ['--data', 'json', '--ann_file', str(tmp_path / 'caps_{split}.json'), '--image_input',
                       'latents', '--text_backbone', 'shapes-tiny-text', '--max_len', '16']
    bgs.main(argv + ['--out_dir', str(tmp_path / 'straight')])  # 4 steps cross an epoch; val and test mix grids
    assert 'cider' in json.loads((tmp_path / 'straight' / 'metrics.json').read_text())
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    resumed = interrupted_then_resumed(bgs.main, argv, tmp_path / 'resumed', 2, monkeypatch)
    assert_same_weights(straight['model'], resumed['model'])


@pytest.mark.parametrize('image_input', ['pixels', 'latents'])
def test_blip_end_to_end_run_writes_every_output_and_the_metric_keys(tiny_backbones, tmp_path, image_input):
    bgs.main(BGS_TINY + ['--out_dir', str(tmp_path), '--image_input', image_input])
    for name in ('config.json', 'log.jsonl', 'ckpt.pt', 'metrics.json', 'blip_gated_sparse.png'):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    assert {'bleu4', 'rouge_l', 'cider', 'blind_cider', 'attn_kept_frac', 'gate_mean', 'gate_std', 'steps_to_90_cider',
            'steps_to_95_cider', 'train_samples_per_s', 'peak_mem_mb', 'train_seconds'} <= set(metrics)
    assert 0 < metrics['attn_kept_frac'] < 0.75
    rows = read_log(tmp_path)
    assert [r['step'] for r in rows if 'loss' in r] == [1, 2, 3, 4]
    assert [r['step'] for r in rows if 'val_cider' in r] == [2, 4]               # the convergence curve


def test_blip_loss_falls(tiny_backbones, tmp_path):
    bgs.main(BGS_TINY + ['--out_dir', str(tmp_path), '--max_steps', '40', '--batch_size', '8', '--lr', '1e-3',
                         '--eval_every', '0', '--eval_images', '4', '--num_beams', '1'])
    losses = [r['loss'] for r in read_log(tmp_path) if 'loss' in r]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


def test_blip_resumed_run_ends_where_the_uninterrupted_run_does(tiny_backbones, tmp_path, monkeypatch, one_thread):
    bgs.main(BGS_TINY + ['--out_dir', str(tmp_path / 'straight')])
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    resumed = interrupted_then_resumed(bgs.main, BGS_TINY, tmp_path / 'resumed', 2, monkeypatch)
    assert_same_weights(straight['model'], resumed['model'])


@pytest.mark.parametrize('argv, message', [
    (['--gate', 'output'], "--gate 'output' is not one of kv, hidden, off"),
    (['--sparsity', '1'], '--sparsity 1.0 must be in [0, 1)'),
    (['--sparse_in', 'ffn'], "--sparse_in 'ffn' must name self, cross or both"),
    (['--sparse_in', ''], "--sparse_in '' must name self, cross or both"),
    (['--max_new_tokens', '0'], '--max_new_tokens (0) must be >= 1'),
    (['--image_input', 'latents', '--data', 'coco', '--data_root', '/no/such/folder'], "is not a folder"),
    (['--vision_backbone', 'no-such-org/no-such-vit'], "unknown backbone 'no-such-org/no-such-vit'"),
])
def test_blip_mistakes_get_one_clear_message(tiny_backbones, tmp_path, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        bgs.main(BGS_TINY + ['--out_dir', str(tmp_path)] + argv)


def test_blip_adds_a_decoder_bos_to_a_bert_tokenizer_and_grows_the_tied_embeddings(tmp_path):
    from transformers import BertTokenizerFast
    vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'red', 'circle', 'picture', 'of']
    (tmp_path / 'vocab.txt').write_text('\n'.join(vocab))
    BertTokenizerFast(str(tmp_path / 'vocab.txt')).save_pretrained(tmp_path)
    BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path)
    tokenizer = bgs.decoder_tokenizer(str(tmp_path))
    assert tokenizer.bos_token == '[DEC]' and tokenizer.bos_token_id == 10
    decoder = bgs.Decoder(bgs.Config(), backbones.load_backbone(str(tmp_path), 'mlm'), 8, len(tokenizer))
    assert decoder.embeddings.word.num_embeddings == 11
    assert decoder.lm_head.decoder.weight is decoder.embeddings.word.weight   # still tied
    assert decoder(torch.tensor([[10, 5, 8, 9]]), torch.randn(1, 3, 8)).shape == (1, 4, 11)


def test_blip_label_smoothing_latent_scale_and_latent_layers_change_the_computation(tiny_backbones):
    model = blip(tiny_backbones)
    ids, mask, labels = model.tokenize(['a small red circle'])
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        smoothed = model(images, ids, mask, labels)
        model.cfg = replace(model.cfg, label_smoothing=0.0)
        assert not torch.isclose(smoothed, model(images, ids, mask, labels))
    latent = blip(tiny_backbones, '--image_input', 'latents', '--latent_layers', '3')
    assert len(latent.image_encoder.blocks) == 3
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a = latent.encode_image(z)
        latent.cfg = replace(latent.cfg, latent_scale=0.13025)
        assert not torch.allclose(a, latent.encode_image(z))
        torch.testing.assert_close(latent.encode_image(z), latent.image_encoder(z * 0.13025))


def test_blip_checkpoint_of_another_shape_names_the_file_and_the_flags(tiny_backbones, tmp_path):
    bgs.main(BGS_TINY + ['--max_steps', '1', '--eval_every', '0', '--out_dir', str(tmp_path)])
    with pytest.raises(UserError, match=r'ckpt.pt does not fit this model; were --gate / --image_input'):
        bgs.main(BGS_TINY + ['--gate', 'off', '--eval_only', 'true', '--out_dir', str(tmp_path)])


def test_blip_predict_captions_each_image_from_the_checkpoint_alone(tiny_backbones, tmp_path, capsys):
    bgs.main(BGS_TINY + ['--max_steps', '1', '--eval_every', '0', '--out_dir', str(tmp_path / 'run')])
    ckpt, config = tmp_path / 'run' / 'ckpt.pt', (tmp_path / 'run' / 'config.json').read_text()
    images = [tmp_path / 'red.png', tmp_path / 'blue.jpg']
    _save_image(images[0], (220, 40, 40))
    _save_image(images[1], (50, 90, 230))
    capsys.readouterr()
    bgs.main(['--predict', *map(str, images), '--init_from', str(ckpt)])  # no other flag: its config
    out = capsys.readouterr().out
    assert all(f'{image}\n  caption: ' in out for image in images) and out.count('caption: ') == 2
    assert (tmp_path / 'run' / 'config.json').read_text() == config    # the run's folder is untouched
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    with pytest.raises(UserError, match=r'cannot read .*bad.png'):
        bgs.main(['--predict', str(tmp_path / 'bad.png'), '--init_from', str(ckpt)])
    with pytest.raises(UserError, match=r"takes --image_input pixels"):
        torch.save(torch.zeros(4, 8, 8), tmp_path / 'latent.pt')
        bgs.main(['--predict', str(tmp_path / 'latent.pt'), '--init_from', str(ckpt)])
    state = torch.load(ckpt, weights_only=True)
    state['method'] = 'cal'
    torch.save(state, tmp_path / 'other.pt')
    with pytest.raises(UserError, match='written by cal, not blip_gated_sparse'):
        bgs.main(['--predict', str(images[0]), '--init_from', str(tmp_path / 'other.pt')])



def save_tiny_blip_release(folder):
    """A random BlipForConditionalGeneration (ViT 32 px, 2 + 2 layers, 32 wide, the built-in vocabulary) saved as a
    release folder with its tokenizer; weights drawn wider than HF's init so that captions are not all ties."""
    tokenizer = backbones.build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = transformers.BlipConfig(vision_config=dict(small, image_size=32, patch_size=8),
                                     text_config=dict(small, vocab_size=len(tokenizer), encoder_hidden_size=32,
                                                      max_position_embeddings=64, **ids))
    torch.manual_seed(0)
    blip = transformers.BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, weight in blip.named_parameters():
            if weight.dim() > 1 or 'bias' in name:
                weight.normal_(std=0.3)
    blip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return blip


def test_a_released_blip_loads_with_hf_logits_and_hf_beam_search_captions(tiny_backbones, tmp_path):
    hf = save_tiny_blip_release(tmp_path / 'blip')
    argv = ['--init_from', str(tmp_path / 'blip'), '--gate', 'off', '--sparsity', '0', '--image_size', '32']
    cfg = parse_config(bgs.Config, bgs.PRESETS, argv, stem='blip_gated_sparse')
    model = bgs.Captioner(cfg, bgs.decoder_tokenizer(cfg.init_from), *bgs.released_captioner(cfg.init_from)).eval()
    torch.manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32)
    ids, mask, _ = model.tokenize(['a red circle', 'a large blue square at the top', 'two crosses', 'a'])
    with torch.no_grad():
        ours = model.decoder(ids, model.encode_image(pixels), mask)
        theirs = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-4
    with torch.no_grad():
        captions = model.generate(model.encode_image(pixels))
        prompt = model.tokenize([''] * 4)[0]                                       # [DEC] a picture of [SEP]
        out = hf.generate(pixel_values=pixels, input_ids=prompt, num_beams=cfg.num_beams, early_stopping=True,
                          max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
    hf_captions = model.tokenizer.batch_decode(out[:, model.n_prompt:], skip_special_tokens=True)
    assert captions == hf_captions and len(set(captions)) > 1
    with pytest.raises(UserError, match='is a released bert model; this method starts from blip'):
        backbones.release_config(str(tiny_backbones / 'shapes-tiny-text'), 'blip')


def test_blip_evaluates_and_fine_tunes_a_released_captioner_saved_as_a_folder(tiny_backbones, tmp_path):
    save_tiny_blip_release(tmp_path / 'blip')
    release = ['--init_from', str(tmp_path / 'blip'), '--image_size', '32']
    bgs.main(BGS_TINY + release + ['--gate', 'off', '--sparsity', '0', '--eval_only', 'true',
                                       '--out_dir', str(tmp_path / 'eval')])
    assert 'cider' in json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
    bgs.main(BGS_TINY + release + ['--max_steps', '2', '--eval_every', '0', '--out_dir', str(tmp_path / 'tune')])
    state = torch.load(tmp_path / 'tune' / 'ckpt.pt', weights_only=True)
    assert state['method'] == 'blip_gated_sparse' and state['step'] == 2

# ============================================================================= cal.py

import cal

CAL_TINY = ['--stage1_steps', '3', '--max_steps', '3', '--batch_size', '4', '--eval_images', '4', '--log_every', '1',
            '--warmup_steps', '1', '--max_new_tokens', '4']


def cal_model(tiny_backbones, *argv):
    cfg = parse_config(cal.Config, cal.PRESETS, list(argv), stem='cal')
    torch.manual_seed(0)
    return cal.VLM(cfg, backbones.load_backbone(cfg.vision_backbone, 'vision'), backbones.load_backbone(cfg.lm_backbone, 'lm'),
                   backbones.load_tokenizer(cfg.lm_backbone)).eval()


def cal_rows(model, n=4, answers=None, start=0):
    world = data.ShapesWorld(seed=0)
    items = [dict(image=world.transform(world.image('train', start + i)), caption=(answers or [None] * n)[i] or
                  world.captions('train', start + i)[0], image_id=i) for i in range(n)]
    return cal.collate_rows(items, model.tokenizer, model.cfg, model.n_image)


def test_no_image_pass_gives_the_text_logits_of_the_official_2d_masking_and_no_nan(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    for llm in (Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2)),
                LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))):
        llm.eval()
        model = type('M', (), {'n_image': 5, 'llm': llm})()                     # what logits_without_image reads
        start, L = 2, 14
        x = torch.randn(3, L, 32)
        mask = torch.ones(3, L, dtype=torch.long)
        mask[1, 11:], mask[2, 9:] = 0, 0                                         # right padding
        ours = cal.VLM.logits_without_image(model, x, mask, start)              # (3, L - 5, V)
        official = mask.clone()
        official[:, start:start + 5] = 0                                         # the code: image positions zeroed
        theirs = llm(inputs_embeds=x, attention_mask=official).logits           # (3, L, V)
        text = torch.cat([torch.arange(start), torch.arange(start + 5, L)])
        for b in range(3):
            real = mask[b, text].bool()
            torch.testing.assert_close(ours[b][real], theirs[b, text][real], atol=1e-5, rtol=1e-5)
        assert not ours.isnan().any() and not theirs.isnan().any()


def test_delta_from_gathered_target_logits_equals_delta_from_full_logits(tiny_backbones):
    model = cal_model(tiny_backbones)
    rows = cal_rows(model)
    with torch.no_grad():
        logits, x = model(rows['input_ids'], rows['image'], rows['image_start'], rows['attention_mask'])
        targets = rows['labels'][:, 1:]
        delta = cal.target_gain(model, x, rows['attention_mask'], rows['image_start'], logits[:, :-1], targets)['logit']
        full = model.logits_without_image(x, rows['attention_mask'], rows['image_start'])   # (B, L - N, V)
    start, N = rows['image_start'], model.n_image
    for b in range(len(targets)):
        for t in range(targets.shape[1]):
            if targets[b, t] == -100:
                continue
            assert start + N <= t                                                # answers come after the image
            by_hand = logits[b, t, targets[b, t]] - full[b, t - N, targets[b, t]]
            torch.testing.assert_close(delta[b, t], by_hand, atol=1e-5, rtol=1e-5)
    assert (delta[:, start:start + N - 1] == 0).all()                            # positions inside the image


def test_cal_weights_clamp_pool_and_normalise_on_a_hand_example():
    cfg = cal.Config()
    delta = torch.tensor([[0.0, 2.0, 7.0, 3.0], [4.0, -1.0, 1.5, 9.0]])
    answer = torch.tensor([[False, True, True, True], [True, True, False, False]])
    # clamped: [[1, 2, 5, 3], [4, 1, 1.5, 5]]; flat pools the 8 values as one row, padding not counted
    flat = cal.cal_weights(delta, answer, cfg)
    expected = torch.tensor([[1.5, 8 / 3, 10 / 3, 4.0], [8 / 3, 6.5 / 3, 7.5 / 3, 3.25]])
    torch.testing.assert_close(flat, expected)
    sample = cal.cal_weights(delta, answer, replace(cfg, cal_pool='sample'))   # within each row, answers only
    torch.testing.assert_close(sample[answer], torch.tensor([3.5, 10 / 3, 4.0, 2.5, 2.5]))
    ce = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 0.0, 0.0]])
    w = sample
    assert math.isclose(((w * ce).sum() / (w[answer].sum() + 1e-6)).item(),
                        (3.5 * 1 + 10 / 3 * 2 + 4 * 3 + 2.5 * 4 + 2.5 * 5) / (3.5 + 10 / 3 + 4 + 2.5 + 2.5 + 1e-6),
                        rel_tol=1e-6)


def test_with_cal_false_the_loss_is_the_plain_next_token_ce(tiny_backbones):
    model = cal_model(tiny_backbones)
    rows = cal_rows(model)
    loss = cal.answer_loss(model, model, rows, model.cfg, use_cal=False)['loss']
    x = model.embed(rows['input_ids'], rows['image'], rows['image_start'])
    hf = model.llm(inputs_embeds=x, attention_mask=rows['attention_mask'], labels=rows['labels']).loss
    torch.testing.assert_close(loss, hf)


def test_with_cal_the_loss_is_the_cal_weighted_mean_of_the_token_ce(tiny_backbones, monkeypatch):
    model = cal_model(tiny_backbones)
    rows = cal_rows(model)
    targets = rows['labels'][:, 1:]
    delta = torch.rand(targets.shape, generator=torch.Generator().manual_seed(0)) * 6   # Δo in [0, 6)
    monkeypatch.setattr(cal, 'target_gain', lambda *args, **kwargs: {'logit': delta})
    weighted = cal.answer_loss(model, model, rows, model.cfg, use_cal=True)
    with torch.no_grad():
        logits, _ = model(rows['input_ids'], rows['image'], rows['image_start'], rows['attention_mask'])
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction='none').view(targets.shape)
    answer = targets != -100
    w = cal.cal_weights(delta, answer, model.cfg)
    torch.testing.assert_close(weighted['loss'], (w * ce).sum() / (w[answer].sum() + 1e-6))
    assert not torch.isclose(weighted['loss'], ce[answer].mean())
    torch.testing.assert_close(weighted['at_beta'], (delta[answer] >= 5).float().mean())


@pytest.mark.parametrize('pool', ['flat', 'sample'])
def test_text_only_rows_get_weight_1(tiny_backbones, pool):
    model = cal_model(tiny_backbones, '--cal_pool', pool)
    world = data.ShapesWorld(seed=0)
    items = [dict(image=world.transform(world.image('train', i)) if i != 1 else None, image_id=i,
                  caption=['a red circle', 'a large blue square', 'a cross', 'a green triangle'][i]) for i in range(4)]
    rows = cal.collate_rows(items, model.tokenizer, model.cfg, model.n_image)
    assert rows['attention_mask'][1, rows['image_start']:rows['image_start'] + model.n_image].sum() == 0
    with torch.no_grad():
        logits, x = model(rows['input_ids'], rows['image'], rows['image_start'], rows['attention_mask'])
        targets = rows['labels'][:, 1:]
        delta = cal.target_gain(model, x, rows['attention_mask'], rows['image_start'], logits[:, :-1], targets)['logit']
    w = cal.cal_weights(delta, targets != -100, model.cfg)
    assert (w[1][targets[1] != -100] == 1).all()
    assert delta[1].abs().max() < 1e-4                                           # its two passes are the same
    assert delta[0][targets[0] != -100].abs().max() > 1e-3                       # an image row's are not


def test_text_only_rows_reach_the_loss_with_weight_1_whatever_their_gain(tiny_backbones, monkeypatch):
    model = cal_model(tiny_backbones, '--cal_alpha', '0.5')                       # Δo = 0 alone would not give 1
    world = data.ShapesWorld(seed=0)
    items = [dict(image=world.transform(world.image('train', i)) if i != 1 else None, image_id=i,
                  caption=['a red circle', 'a large blue square', 'a cross'][i]) for i in range(3)]
    rows = cal.collate_rows(items, model.tokenizer, model.cfg, model.n_image)
    assert rows['text_only'].tolist() == [False, True, False]
    monkeypatch.setattr(cal, 'cal_weights', lambda delta, answer, cfg: torch.full_like(delta, 3.0))
    loss = cal.answer_loss(model, model, rows, model.cfg, use_cal=True)['loss']
    one = lambda b: {k: v[b:b + 1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in rows.items()}
    mean_ce = [cal.answer_loss(model, model, one(b), model.cfg, use_cal=False)['loss'] for b in range(3)]
    count = [(rows['labels'][b] != -100).sum() for b in range(3)]
    weight = [3.0, 1.0, 3.0]
    expected = sum(w * m * n for w, m, n in zip(weight, mean_ce, count)) / sum(w * n for w, n in zip(weight, count))
    torch.testing.assert_close(loss, expected)
    with torch.no_grad():                                                        # the logged Δo: image rows only
        logits, x = model(rows['input_ids'], rows['image'], rows['image_start'], rows['attention_mask'])
        targets = rows['labels'][:, 1:]
        delta = cal.target_gain(model, x, rows['attention_mask'], rows['image_start'], logits[:, :-1], targets)['logit']
    logged = cal.answer_loss(model, model, rows, model.cfg, use_cal=True)['delta']
    torch.testing.assert_close(logged, delta[[0, 2]][targets[[0, 2]] != -100].mean())


def test_text_only_frac_makes_that_share_of_stage_2_rows_captions_without_the_image(tiny_backbones):
    cfg = parse_config(cal.Config, cal.PRESETS, ['--text_only_frac', '0.25'], stem='cal')
    world = data.ShapesWorld(seed=0, train_images=200)
    rows = cal.training_rows(cfg, 2, world)
    items = [rows[k] for k in range(400)]
    text_only = [item['image'] is None for item in items]
    assert 0.18 < np.mean(text_only) < 0.32
    assert all('caption' in item for item, blind in zip(items, text_only) if blind)
    assert all(item['image'] is not None for item in (cal.training_rows(cfg, 1, world)[k] for k in range(50)))
    plain = cal.training_rows(replace(cfg, text_only_frac=0.0), 2, world)
    assert all(plain[k]['image'] is not None for k in range(100))


def test_the_logprob_gain_subtracts_each_pass_log_normaliser_on_hand_made_logits():
    with_image = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 3.0, 1.0]]])      # (1, T=3, V=3)
    without = torch.tensor([[[5.0, 5.0, 5.0], [0.0, 0.0, 1.0]]])                         # text positions 0 and 2
    model = SimpleNamespace(n_image=1, logits_without_image=lambda x, mask, start: without)
    targets = torch.tensor([[-100, 1, 2]])                                   # position 1 is inside the image
    gains = cal.target_gain(model, torch.zeros(1, 4, 2), None, 1, with_image, targets, ('logit', 'logprob'))
    lse = lambda row: math.log(sum(math.exp(v) for v in row))
    assert gains['logit'][0].tolist() == pytest.approx([0.0 - 5.0, 0.0, 1.0 - 1.0])
    assert gains['logprob'][0].tolist() == pytest.approx([(0 - lse([0, 0, 0])) - (5 - lse([5, 5, 5])), 0.0,
                                                          (1 - lse([0, 3, 1])) - (1 - lse([0, 0, 1]))])


def test_cal_gain_chooses_the_gain_the_weights_come_from(tiny_backbones):
    model = cal_model(tiny_backbones, '--cal_alpha', '1e-3', '--cal_beta', '1e3')  # the weights follow each gain
    rows = cal_rows(model)
    with torch.no_grad():
        logit = cal.answer_loss(model, model, rows, model.cfg, use_cal=True)
        logprob = cal.answer_loss(model, model, rows, replace(model.cfg, cal_gain='logprob'), use_cal=True)
        logits, x = model(rows['input_ids'], rows['image'], rows['image_start'], rows['attention_mask'])
        targets = rows['labels'][:, 1:]
        gains = cal.target_gain(model, x, rows['attention_mask'], rows['image_start'], logits[:, :-1], targets,
                                ('logit', 'logprob'))
    answer = targets != -100
    for losses, kind in ((logit, 'logit'), (logprob, 'logprob')):
        torch.testing.assert_close(losses['delta'], gains[kind][answer].mean())
    assert not torch.isclose(logit['loss'], logprob['loss'])


def test_gain_study_puts_each_token_in_its_group(tiny_backbones, monkeypatch):
    model = cal_model(tiny_backbones, '--eval_images', '6', '--batch_size', '4')
    world = data.ShapesWorld(seed=0)
    # hand-made gains: each target token's own id (logit) and minus it (logprob)
    monkeypatch.setattr(cal, 'target_gain', lambda model, x, mask, start, logits, targets, kinds:
                        {'logit': targets.float(), 'logprob': -targets.float()})
    gains, metrics = cal.gain_study(model, model.cfg, world, 'cpu')
    ids = lambda words: model.tokenizer.convert_tokens_to_ids(words)
    expected = {group: [] for group in cal.GAIN_GROUPS}
    for i, clean, corrupted, k in cal.noisy_pairs(world, 'val', range(6)):
        assert word_diff(clean, corrupted) == [k] and names_what_the_scene_lacks(corrupted, k, world.scene('val', i))
        words = clean.split()
        expected['corrupt'] += ids([corrupted.split()[k]])
        expected['true'] += ids([words[k]])
        expected['visual'] += ids([w for j, w in enumerate(words) if j != k and w in data.VISUAL_WORDS])
        expected['other'] += ids([w for w in words if w not in data.VISUAL_WORDS])
    for group in cal.GAIN_GROUPS:
        assert sorted(gains['logit'][group].tolist()) == sorted(expected[group]), group
        assert metrics[f'delta_{group}'] == pytest.approx(np.mean(expected[group]))
        assert metrics[f'logprob_delta_{group}'] == pytest.approx(-np.mean(expected[group]))
    true, corrupt = torch.tensor(expected['true']), torch.tensor(expected['corrupt'])
    assert metrics['delta_auroc_corrupt'] == pytest.approx(
        100 * ((true[:, None] > corrupt).float() + 0.5 * (true[:, None] == corrupt).float()).mean().item())


def test_collate_rows_asks_the_tokenizer_for_its_vocabulary_once_not_per_batch(tiny_backbones, monkeypatch):
    model = cal_model(tiny_backbones)
    calls, get_vocab = [], model.tokenizer.get_vocab
    monkeypatch.setattr(model.tokenizer, 'get_vocab', lambda: calls.append(1) or get_vocab())
    first = cal_rows(model)
    for start in (4, 8, 12):
        rows = cal_rows(model, start=start)
    assert len(calls) <= 1
    for row_ids, visual in zip(rows['input_ids'], rows['visual_mask']):
        tokens = model.tokenizer.convert_ids_to_tokens(row_ids[visual].tolist())
        assert tokens and all(t in data.VISUAL_WORDS for t in tokens)
    assert first['visual_mask'].any()


def test_stage_1_trains_the_projector_only_and_stage_2_the_llm_too(tiny_backbones, tmp_path):
    before = cal_model(tiny_backbones).state_dict()
    changed = lambda after, prefix: [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
    cal.main(CAL_TINY + ['--stage', '1', '--out_dir', str(tmp_path / 'one')])
    after = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    assert not changed(after, 'llm.') and not changed(after, 'vision.') and changed(after, 'projector.')
    cal.main(CAL_TINY + ['--stage', 'both', '--out_dir', str(tmp_path / 'both')])
    after = torch.load(tmp_path / 'both' / 'ckpt.pt', weights_only=True)['model']
    assert changed(after, 'llm.') and not changed(after, 'vision.') and changed(after, 'projector.')


def test_the_llm_start_token_comes_before_the_image_and_no_end_token(tiny_backbones):
    model = cal_model(tiny_backbones)
    rows = cal_rows(model, n=1)
    tok = model.tokenizer
    assert tok.convert_ids_to_tokens(rows['input_ids'][0, :rows['image_start']].tolist()) == ['[CLS]', 'image', ':']
    assert cal.text_before_image(tok, 'image :') == rows['input_ids'][0, :3].tolist()


def test_batched_left_padded_generation_equals_one_by_one(tiny_backbones):
    model = cal_model(tiny_backbones, '--max_new_tokens', '6')
    world = data.ShapesWorld(seed=0)
    images = torch.stack([world.transform(world.image('test', i)) for i in range(3)])
    prompts = ['describe this image .', 'what color is the large circle ?', 'how many objects are there ?']
    batched = model.generate(images, prompts)
    assert batched == [model.generate(images[i:i + 1], [p])[0] for i, p in enumerate(prompts)]


def test_cal_end_to_end_run_writes_every_output_and_the_metric_keys(tiny_backbones, tmp_path):
    cal.main(CAL_TINY + ['--caption_noise', '0.5', '--out_dir', str(tmp_path)])
    for name in ('config.json', 'log.jsonl', 'ckpt.pt', 'metrics.json', 'cal.png', 'cal_gain.png'):
        assert (tmp_path / name).is_file(), name
    assert Image.open(tmp_path / 'cal_gain.png').size[1] > 4 * 90                 # four histogram panels
    metrics = json.loads((tmp_path / 'metrics.json').read_text())
    gain_keys = {f'{prefix}_{group}' for prefix in ('delta', 'logprob_delta') for group in cal.GAIN_GROUPS}
    assert {'bleu4', 'rouge_l', 'cider', 'blind_cider', 'vqa_acc', 'blind_vqa_acc', 'vqa_acc_color', 'delta_auroc',
            'delta_auroc_corrupt', 'logprob_delta_auroc_corrupt', 'cal_overhead', 'train_samples_per_s',
            'peak_mem_mb', 'train_seconds', *gain_keys} <= set(metrics)
    assert not any(key.startswith('cal_weight') for key in metrics)               # no training-time accumulator
    rows = read_log(tmp_path)
    assert [r['step'] for r in rows] == list(range(1, 7)) and {'delta', 'at_alpha', 'at_beta'} <= set(rows[0])
    assert json.loads((tmp_path / 'config.json').read_text())['caption_noise'] == 0.5


def test_cal_loss_falls(tiny_backbones, tmp_path):
    cal.main(CAL_TINY + ['--out_dir', str(tmp_path), '--stage', '2', '--max_steps', '40', '--lr', '2e-3',
                         '--batch_size', '8', '--eval_images', '2'])
    losses = [r['loss'] for r in read_log(tmp_path)]
    assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:6]), losses


def test_cal_resumed_run_ends_where_the_uninterrupted_run_does(tiny_backbones, tmp_path, monkeypatch, one_thread):
    argv = CAL_TINY + ['--eval_every', '2', '--eval_images', '2', '--caption_noise', '0.3']
    cal.main(argv + ['--out_dir', str(tmp_path / 'straight')])
    straight = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    for stop_at in (2, 3, 5):  # in stage 1, at its end, and in stage 2
        resumed = interrupted_then_resumed(cal.main, argv, tmp_path / f'resumed{stop_at}', stop_at, monkeypatch)
        assert_same_weights(straight['model'], resumed['model'])


def test_shard_makes_each_decoder_layer_and_vision_layer_an_fsdp_unit_under_the_root(tiny_backbones):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    model = cal_model(tiny_backbones)
    layers = [m for lists in (model.llm.model.layers, model.vision.layers) for m in lists]
    torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        run = common.Run(device=torch.device('cpu'), fsdp=True)
        assert common.shard(model, run) is model and common.shard(model, run) is model  # in place, once
        assert all(isinstance(m, FSDPModule) for m in [model, *layers])
        assert not any(isinstance(m, FSDPModule) for m in (model.llm, model.llm.model, model.projector))
        assert all(isinstance(p, DTensor) for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()


CAL_FSDP_SCRIPT = '''
import shutil, sys
sys.path.insert(0, {repo!r})
import common, cal
argv, out = {argv!r}, {out!r}
common.teardown = lambda run: None           # one process group for all runs (a second one can hang)
cal.main(argv + ['--out_dir', out + '/straight'])
cal.main(argv + ['--out_dir', out + '/ddp', '--fsdp', 'false'])


class Died(Exception):
    pass


save = common.save_checkpoint


def save_then_die(path, method, model, optimizer, step, cfg, **extra):  # on every rank
    save(path, method, model, optimizer, step, cfg, **extra)
    if step == 3 and common.dist.get_rank() == 0:
        shutil.copy(path, out + '/stage1.pt')    # the end of stage 1, before stage 2 overwrites it
    if step in (3, 5):
        raise Died


common.save_checkpoint = save_then_die
for resume in ('false', 'true', 'true'):     # killed at the end of stage 1, again in stage 2, then to the end
    try:
        cal.main(argv + ['--out_dir', out + '/resumed', '--resume', resume])
    except Died:
        pass
common.dist.barrier()
common.dist.destroy_process_group()
'''


def test_cal_fsdp_on_two_ranks_checkpoints_whole_tensors_and_resumes_to_the_same_losses(tiny_backbones, tmp_path):
    argv = CAL_TINY + ['--fsdp', 'true', '--device', 'cpu', '--eval_every', '2', '--eval_images', '2',
                       '--grad_checkpointing', 'true', '--batch_size', '2', '--grad_accum', '2']
    script = tmp_path / 'fsdp.py'
    script.write_text(CAL_FSDP_SCRIPT.format(repo=str(REPO), argv=argv, out=str(tmp_path)))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'NANOALIGN_BACKBONES': str(tiny_backbones)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = lambda run: [(r['step'], r['loss']) for r in read_log(tmp_path / run) if 'loss' in r]
    assert losses('resumed') == losses('straight') and len(losses('straight')) == 6
    straight, resumed = (torch.load(tmp_path / run / 'ckpt.pt', weights_only=True) for run in ('straight', 'resumed'))
    assert_same_weights(straight['model'], resumed['model'])
    ddp = torch.load(tmp_path / 'ddp' / 'ckpt.pt', weights_only=True)                # the same two ranks unsharded
    assert_same_weights(straight['model'], ddp['model'], atol=1e-5)
    assert np.allclose([loss for _, loss in losses('ddp')], [loss for _, loss in losses('straight')], atol=1e-5)
    model = cal_model(tiny_backbones)
    before, stage1 = model.state_dict(), torch.load(tmp_path / 'stage1.pt', weights_only=True)
    changed = lambda after, prefix: [k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])]
    assert changed(stage1['model'], 'projector.') and not changed(stage1['model'], 'llm.')   # stage 1: projector only
    assert changed(straight['model'], 'llm.') and not changed(straight['model'], 'vision.')
    assert straight['model'].keys() == before.keys() and all(not isinstance(v, torch.distributed.tensor.DTensor)
                                                             for v in straight['model'].values())
    optimizer = torch.optim.AdamW(common.param_groups(torch.nn.ModuleList([model.projector, model.llm]), 0.0))
    optimizer.load_state_dict(straight['optimizer'])                      # torch's own format, indexed params
    sharded = json.loads((tmp_path / 'straight' / 'metrics.json').read_text())
    cal.main(CAL_TINY + ['--eval_only', 'true', '--eval_images', '2', '--out_dir', str(tmp_path / 'straight'),
                         '--fsdp', 'true'])                               # one process: --fsdp runs unsharded
    alone = json.loads((tmp_path / 'straight' / 'metrics.json').read_text())
    assert {k: v for k, v in sharded.items() if k in alone} == alone and 'cider' in alone


def test_cal_loads_a_vision_model_and_a_qwen2_llm_saved_locally(tiny_backbones, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tokenizer = backbones.build_tokenizer()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / 'lm')
    tokenizer.save_pretrained(tmp_path / 'lm')
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=64, patch_size=16)).save_pretrained(tmp_path / 'clip')
    cal.main(CAL_TINY + ['--lm_backbone', str(tmp_path / 'lm'), '--vision_backbone', str(tmp_path / 'clip'),
                         '--out_dir', str(tmp_path / 'out')])
    state = torch.load(tmp_path / 'out' / 'ckpt.pt', weights_only=True)
    assert state['model']['projector.0.weight'].shape == (32, 32)                # CLIP width -> Qwen2 width
    assert 'cider' in json.loads((tmp_path / 'out' / 'metrics.json').read_text())


@pytest.mark.parametrize('argv, message', [
    (['--stage', '3'], "--stage '3' must be 1, 2 or both"),
    (['--cal_stages', '3'], "--cal_stages '3' must list stages 1 and/or 2"),
    (['--cal_window', '2'], 'an odd --cal_window (2)'),
    (['--text_only_frac', '0.2', '--stage', '1'], '--text_only_frac mixes text-only rows into stage 2'),
    (['--cal_gain', 'prob'], "--cal_gain 'prob' must be logit or logprob"),
    (['--caption_noise', '0.1', '--data', 'coco', '--data_root', '/tmp'], '--caption_noise corrupts ShapesWorld'),
    (['--lm_backbone', 'no-such-org/no-such-lm'], "unknown backbone 'no-such-org/no-such-lm'"),
    (['--image_text', ''], "--image_text '' gives no token; the image must not come first"),
])
def test_cal_mistakes_get_one_clear_message(tiny_backbones, tmp_path, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cal.main(CAL_TINY + ['--out_dir', str(tmp_path)] + argv)


def test_cal_window_clamp_bounds_and_vision_layer_change_the_computation(tiny_backbones):
    delta = torch.tensor([[0.0, 2.0, 7.0, 3.0, 4.0]])
    answer = torch.ones_like(delta, dtype=torch.bool)
    cfg = replace(cal.Config(), cal_pool='sample')
    w1 = cal.cal_weights(delta, answer, replace(cfg, cal_window=1))
    assert w1.tolist() == [[1.0, 2.0, 5.0, 3.0, 4.0]]                            # window 1: clamp only
    assert cal.cal_weights(delta, answer, replace(cfg, cal_window=1, cal_alpha=2.5, cal_beta=3.5)).tolist() == \
        [[2.5, 2.5, 3.5, 3.0, 3.5]]
    torch.testing.assert_close(cal.cal_weights(delta, answer, replace(cfg, cal_window=5))[0, 2], torch.tensor(3.0))
    images = torch.randn(2, 3, 64, 64)
    last, penultimate = cal_model(tiny_backbones, '--vision_layer', '-1'), cal_model(tiny_backbones)
    assert not torch.allclose(last.vision_features(images), penultimate.vision_features(images))


def test_cal_stages_and_the_caption_prompt_reach_the_training_rows(tiny_backbones, tmp_path):
    model = cal_model(tiny_backbones, '--caption_prompt', 'describe the picture .')
    rows = cal_rows(model, n=1)
    start = rows['image_start'] + model.n_image
    assert model.tokenizer.decode(rows['input_ids'][0, start:start + 4]) == 'describe the picture .'
    cal.main(CAL_TINY + ['--cal_stages', '2', '--out_dir', str(tmp_path)])
    logged = read_log(tmp_path)
    assert all('delta' not in r for r in logged[:3]) and all('delta' in r for r in logged[3:])   # CAL in stage 2

def test_cal_predict_answers_the_question_for_each_image_from_the_checkpoint_alone(tiny_backbones, tmp_path,
                                                                                 capsys):
    cal.main(CAL_TINY + ['--out_dir', str(tmp_path / 'run')])
    ckpt = tmp_path / 'run' / 'ckpt.pt'
    images = [tmp_path / 'red.png', tmp_path / 'blue.png']
    _save_image(images[0], (220, 40, 40))
    _save_image(images[1], (50, 90, 230))
    capsys.readouterr()
    cal.main(['--predict', *map(str, images), '--init_from', str(ckpt), '--question', 'what color is the circle ?'])
    out = capsys.readouterr().out
    assert all(f'{image}\n  what color is the circle ? -> ' in out for image in images)
    cal.main(['--predict', str(images[0]), '--init_from', str(ckpt)])      # the caption prompt by default
    assert f'{images[0]}\n  describe this image . -> ' in capsys.readouterr().out
    with pytest.raises(UserError, match=r'cannot read .*missing.png'):
        cal.main(['--predict', str(tmp_path / 'missing.png'), '--init_from', str(ckpt)])
    state = torch.load(ckpt, weights_only=True)
    state['method'] = 'blip_gated_sparse'
    torch.save(state, tmp_path / 'other.pt')
    with pytest.raises(UserError, match='written by blip_gated_sparse, not cal'):
        cal.main(['--predict', str(images[0]), '--init_from', str(tmp_path / 'other.pt')])


def resolve(name, scene):
    """Objects named by '[size] [color] (shape|object) [at the POS]' (independent of cal.py's generator)."""
    words, cell = name.split(), None
    if 'at' in words:
        k = words.index('at')
        cell = next((r, c) for r in range(3) for c in range(3) if data.position_phrase(r, c) == ' '.join(words[k + 2:]))
        words = words[:k]
    return [o for o in scene if all(w == 'object' or w in (o['size'], o['color'], o['shape']) for w in words)
            and cell in (None, (o['row'], o['col']))]


def test_questions_are_answerable_correct_for_the_scene_deterministic_and_in_the_vocabulary():
    world, tokenizer = data.ShapesWorld(), backbones.build_tokenizer()
    other_order = data.ShapesWorld()
    other_order.image('train', 99), cal.questions_and_noise(other_order, 'val', 5)  # other calls first
    kinds = set()
    for i in range(300):
        scene, (qa, _) = world.scene('train', i), cal.questions_and_noise(world, 'train', i)
        assert (qa, _) == cal.questions_and_noise(other_order, 'train', i)
        assert all(tokenizer.unk_token_id not in tokenizer(f'{q} {a}').input_ids for q, a, _ in qa)
        for question, answer, kind in qa:
            kinds.add(kind)
            words = question.split()
            assert words[-1] == '?'
            if kind in ('color', 'shape', 'size', 'position'):
                name = ' '.join(words[4 if kind != 'position' else 3:-1])
                (obj,) = resolve(name, scene)  # names exactly one object
                assert answer == (data.position_phrase(obj['row'], obj['col']) if kind == 'position' else obj[kind])
                assert kind == 'position' or obj[kind] not in name.split()  # the name does not give it away
            elif kind == 'count':
                target = words[2]
                n = sum(target == 'objects' or target in (o['color'], data.PLURALS[data.SHAPES.index(o['shape'])])
                        for o in scene)
                assert answer == data.NUMBERS[n]
            else:
                assert answer == ('yes' if resolve(' '.join(words[3:-1]), scene) else 'no')
    assert kinds == {'color', 'shape', 'size', 'position', 'count', 'yesno'}


def test_answer_noise_changes_one_word_of_visual_answers_in_training_only():
    clean, noisy = data.ShapesWorld(train_images=500), data.ShapesWorld(caption_noise=0.3, train_images=500)
    eligible = noised = 0
    for i in range(500):
        qa, noise = cal.questions_and_noise(noisy, 'train', i)
        for (q, a, kind), (q0, a0, kind0), k in zip(qa, cal.questions_and_noise(clean, 'train', i)[0], noise):
            assert (q, kind) == (q0, kind0)
            eligible += kind not in ('count', 'yesno')
            if k < 0:
                assert a == a0
            else:
                noised += 1
                assert kind not in ('count', 'yesno') and word_diff(a0, a) == [k] and a.split()[k] in data.VISUAL_WORDS
                shown = {(o['row'], o['col']) if kind == 'position' else o[kind] for o in noisy.scene('train', i)}
                assert (data.CELLS[a] if kind == 'position' else a) not in shown   # the image contradicts it
    assert 0.2 < noised / eligible < 0.3      # p = 0.3, less the answers with no absent value (a size, both shown)
    clean_qa = cal.questions_and_noise(clean, 'val', 0)[0]
    assert cal.questions_and_noise(noisy, 'val', 0) == (clean_qa, [-1] * len(clean_qa))


def tiny_llava(folder, layer=-2, strategy='default'):
    """A tiny random LLaVA release saved to `folder` as LlavaForConditionalGeneration.save_pretrained writes it (CLIP
    tower 32 px / patch 8 -> 16 patches, Llama LM 48 wide), with the built-in tokenizer plus an <image> token whose id
    is the config's image_token_id -> the HF model (eval, fp32). Every weight is moved off its initial value (biases 0,
    norms 1) so a weight left out or misplaced by the loading shows in the logits."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    tokenizer = backbones.build_tokenizer()
    tokenizer.add_tokens(['<image>'], special_tokens=True)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act='quick_gelu')
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), vision_feature_layer=layer,
                         image_token_id=tokenizer.convert_tokens_to_ids('<image>'),
                         vision_feature_select_strategy=strategy)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.mark.parametrize('layer, strategy', [(-2, 'default'), (-1, 'full')])
def test_a_released_llava_loaded_by_cal_gives_the_hf_logits_at_every_position(tmp_path, layer, strategy):
    hf = tiny_llava(tmp_path / 'llava', layer, strategy)
    cfg = parse_config(cal.Config, cal.PRESETS, ['--init_from', str(tmp_path / 'llava')], stem='cal')
    cfg, release = backbones.llava_release(cfg)
    assert (cfg.vision_layer, cfg.image_size) == (layer, 32)                    # the release's, not the defaults
    assert cfg.vision_backbone == cfg.lm_backbone == str(tmp_path / 'llava')
    parts = backbones.llava_from_hf(cfg.lm_backbone, release)
    model = cal.VLM(cfg, **parts).eval()
    assert model.n_image == 16 + (strategy == 'full')                           # 'full' keeps the CLS
    world = data.ShapesWorld(seed=0, image_size=32)
    items = [dict(image=world.transform(world.image('test', i)), caption=world.captions('test', i)[i], image_id=i)
             for i in range(3)]
    rows = cal.collate_rows(items, model.tokenizer, cfg, model.n_image)          # right-padded, lengths differ
    start, N, mask = rows['image_start'], model.n_image, rows['attention_mask']
    assert not mask.all()
    hf_ids = rows['input_ids'].clone()
    hf_ids[:, start:start + N] = hf.config.image_token_id                        # LLaVA: the image id once per feature
    with torch.no_grad():
        theirs = hf(input_ids=hf_ids, pixel_values=rows['image'], attention_mask=mask).logits   # (B, L, V)
        ours = model(rows['input_ids'], rows['image'], start, mask)[0]                          # (B, L, V)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4
        # the comparison can tell a wrong mapping: a fresh projector, or another feature layer, is far off
        for wrong in (cal.VLM(cfg, **dict(parts, projector=None)), cal.VLM(replace(cfg, vision_layer=layer - 1), **parts)):
            assert (wrong(rows['input_ids'], rows['image'], start, mask)[0] - theirs).abs().max() > 1e-2


def test_cal_eval_only_evaluates_a_released_llava_as_loaded(tiny_backbones, tmp_path):
    tiny_llava(tmp_path / 'llava')
    out = tmp_path / 'out'
    cal.main(CAL_TINY + ['--init_from', str(tmp_path / 'llava'), '--eval_only', 'true', '--out_dir', str(out)])
    assert {'cider', 'blind_cider', 'vqa_acc', 'delta_auroc'} <= set(json.loads((out / 'metrics.json').read_text()))
    config = json.loads((out / 'config.json').read_text())
    assert config['vision_backbone'] == config['lm_backbone'] == str(tmp_path / 'llava')   # recorded as the backbones
    assert (config['vision_layer'], config['image_size']) == (-2, 32)
    assert not (out / 'ckpt.pt').exists()


def test_cal_trains_from_a_released_llava_and_predicts_from_that_checkpoint(tiny_backbones, tmp_path, capsys):
    hf = tiny_llava(tmp_path / 'llava')
    cal.main(CAL_TINY + ['--init_from', str(tmp_path / 'llava'), '--out_dir', str(tmp_path / 'run')])
    trained = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)['model']
    released = dict({f'vision.{k}': v for k, v in hf.model.vision_tower.state_dict().items()},
                    **{f'projector.{k}': v for k, v in (('0.weight', hf.model.multi_modal_projector.linear_1.weight),
                                                        ('2.weight', hf.model.multi_modal_projector.linear_2.weight))},
                    **{f'llm.model.{k}': v for k, v in hf.model.language_model.state_dict().items()},
                    **{'llm.lm_head.weight': hf.lm_head.weight})
    for k, v in released.items():
        if k.startswith('vision.'):
            assert torch.equal(trained[k], v), k                                 # the tower stays frozen
    for k in ('projector.0.weight', 'projector.2.weight', 'llm.model.embed_tokens.weight', 'llm.lm_head.weight'):
        change = (trained[k] - released[k]).abs().max()
        assert 0 < change < 0.05, (k, change)                                    # trained, from the release's weights
    image = tmp_path / 'red.png'
    _save_image(image)
    capsys.readouterr()
    cal.main(['--predict', str(image), '--init_from', str(tmp_path / 'run' / 'ckpt.pt')])  # the config names the release
    assert f'{image}\n  describe this image . -> ' in capsys.readouterr().out


def test_cal_init_from_another_model_type_or_unsupported_llava_features_gets_one_clear_message(tmp_path):
    from transformers import LlavaConfig
    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(tmp_path / 'bert')
    LlavaConfig(vision_feature_layer=[-2, -5]).save_pretrained(tmp_path / 'multi')       # a config is enough to tell
    for folder, message in (('bert', 'is a released bert model; this method starts from llava models'),
                            ('multi', "reads vision layers [-2, -5] with strategy 'default'; supported: one layer")):
        with pytest.raises(UserError, match=re.escape(f'--init_from {tmp_path / folder} {message}')):
            cal.main(CAL_TINY + ['--init_from', str(tmp_path / folder), '--eval_only', 'true',
                                 '--out_dir', str(tmp_path / 'out')])

# ============================================================================= the four method files together

from dataclasses import fields

BACKBONE_FLAGS = {'vision_backbone', 'text_backbone', 'lm_backbone'}


def names_a_backbone(field):
    """A text field that names a pretrained model: by its name, or by a built-in backbone as its default."""
    return isinstance(field.default, str) and (re.search(r'backbone|model|llm|tower|encoder', field.name)
                                               or field.default.startswith('shapes-tiny'))


def test_the_two_stage_files_share_stage_flags_and_backbone_flags_have_the_shared_names():
    stage_flags = lambda config: {f.name for f in fields(config) if f.name.startswith('stage')}
    assert stage_flags(cal.Config) == stage_flags(a2p.Config) == {'stage', 'stage1_steps', 'stage1_lr'}
    for config in (ae.Config, a2p.Config, bgs.Config, cal.Config):
        named = {f.name for f in fields(config) if names_a_backbone(f)}
        assert named and named <= BACKBONE_FLAGS, (config.__module__, named)


@pytest.mark.parametrize('module, old, new', [
    (cal, 'llm', 'lm_backbone'), (cal, 'vision_model', 'vision_backbone'),
    (a2p, 'phase', 'stage'), (a2p, 'phase2_steps', 'max_steps'), (a2p, 'phase2_lr', 'lr'),
])
def test_a_renamed_flag_gets_the_unknown_flag_message_that_names_the_new_one(module, old, new):
    with pytest.raises(UserError, match=f'unknown flag --{old}; did you mean --{new}[?]'):
        parse_config(module.Config, module.PRESETS, [f'--{old}', '1'])


@pytest.mark.parametrize('name', ['albef_epic', 'align_two_phase', 'blip_gated_sparse', 'cal'])
def test_every_method_counts_flops_on_a_step_that_leaves_training_unchanged(name, tiny_backbones, tmp_path,
                                                                           monkeypatch, one_thread):
    module, argv = dict(albef_epic=(ae, AE_TINY), align_two_phase=(a2p, A2P_TINY),
                        blip_gated_sparse=(bgs, BGS_TINY), cal=(cal, CAL_TINY))[name]
    module.main(argv + ['--out_dir', str(tmp_path / 'plain')])
    counted, count_flops = [], common.count_flops

    def count_as_on_cuda(loss_of_one_batch, model, samples, run):  # the CUDA path, run on the CPU
        on_cuda = SimpleNamespace(device=torch.device('cuda'), autocast=run.autocast)
        counted.append(count_flops(loss_of_one_batch, model, samples, on_cuda))
        return counted[-1]

    monkeypatch.setattr(common, 'count_flops', count_as_on_cuda)
    module.main(argv + ['--out_dir', str(tmp_path / 'counted')])
    assert counted and all(flops > 0 for flops in counted)  # one count per stage
    plain, with_count = (torch.load(tmp_path / run / 'ckpt.pt', weights_only=True) for run in ('plain', 'counted'))
    assert_same_weights(plain['model'], with_count['model'], atol=0)


@pytest.mark.parametrize('name', ['albef_epic', 'align_two_phase', 'blip_gated_sparse'])
def test_fsdp_is_refused_by_the_methods_whose_presets_fit_one_gpu(name, tmp_path):
    module = dict(albef_epic=ae, align_two_phase=a2p, blip_gated_sparse=bgs)[name]
    with pytest.raises(UserError, match='--fsdp: this method does not shard'):
        module.main(['--fsdp', 'true', '--out_dir', str(tmp_path)])


def test_the_paper_scale_stand_ins_have_the_published_sizes():
    import transformers
    with torch.device('meta'):
        sizes = {name: backbones.count_params(getattr(transformers, model)(getattr(transformers, config)(**kwargs)))
                 for name, (model, config, kwargs) in backbones.STAND_INS.items()}
    published = {'deit-base-patch16-224': 86.4, 'vit-base-patch16-224-in21k': 86.4, 'clip-vit-base-patch32': 87.5,
                 'clip-vit-large-patch14-336': 303.5, 'bert-base-uncased': 109.5, 'all-MiniLM-L6-v2': 22.7,
                 'Qwen2.5-0.5B-Instruct': 494.0, 'Qwen2.5-1.5B-Instruct': 1543.7}   # millions, the Hub's models
    assert {name: round(n / 1e6, 1) for name, n in sizes.items()} == published


def test_every_coco_preset_runs_end_to_end_on_tiny_paper_scale_stand_ins(tmp_path):
    si = backbones.write_stand_ins(tmp_path / 'si', tiny=True, images=(8, 2, 2))
    assert len(json.loads((si / 'coco' / 'coco_karpathy_train.json').read_text())) == 8 * 5
    common_flags = ['--data', 'coco', '--data_root', str(si / 'coco'), '--batch_size', '2']
    runs = [(ae, ['--vision_backbone', 'deit-base-patch16-224', '--text_backbone', 'bert-base-uncased',
                  '--max_steps', '2']),
            (bgs, ['--vision_backbone', 'vit-base-patch16-224-in21k', '--text_backbone', 'bert-base-uncased',
                   '--max_steps', '2']),
            (cal, ['--vision_backbone', 'clip-vit-large-patch14-336', '--lm_backbone', 'Qwen2.5-0.5B-Instruct',
                   '--stage1_steps', '1', '--max_steps', '1']),
            (a2p, ['--vision_backbone', 'clip-vit-base-patch32', '--text_backbone', 'all-MiniLM-L6-v2',
                   '--lm_backbone', 'Qwen2.5-1.5B-Instruct', '--stage1_steps', '1', '--max_steps', '1'])]
    for module, argv in runs:
        argv = [str(si / a) if (si / a).is_dir() else a for a in argv]      # backbone names -> stand-in folders
        module.main(common_flags + argv + ['--out_dir', str(tmp_path / module.METHOD)])
        config = json.loads((tmp_path / module.METHOD / 'config.json').read_text())
        preset = module.PRESETS['coco']
        assert config['image_size'] == preset['image_size']                   # the preset, not the shapes one
        metrics = json.loads((tmp_path / module.METHOD / 'metrics.json').read_text())
        assert {'train_samples_per_s', 'peak_mem_mb'} <= set(metrics), module.METHOD
