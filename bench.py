"""
bench.py — side-by-side timings. The rows of one comparison are built in one process and timed in
interleaved rounds (row 1, row 2, ..., row 1, row 2, ...), so a slow moment of the machine falls on
every row alike; a row's time is its median over the rounds, and the table gives each row against
the first.

    python bench.py blip                  # BLIP training step: dense, gate, top-k, default, latents
    python bench.py blip --rounds 30 --device cuda --dtype bfloat16
    python bench.py hf                    # the project's modules and captioner against HF's classes
    python bench.py albef                 # ALBEF + EPIC training step: the five ablation rows
    python bench.py epitc                 # EPIC's consistency pass on all patches or on half
"""
import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
import transformers

import albef_epic as ae
import backbones
import blip_gated_sparse as bgs
import common
from data import ShapesWorld, build_dataset, collate


def interleaved(rows, rounds, warmup=2):
    """rows {name: fn} -> {name: median seconds of one call}, the rows called in turn each round."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for fn in rows.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(title, seconds, samples, unit):
    """A markdown table: each row's samples/s and its step time against the first row's."""
    first = next(iter(seconds.values()))
    print(f"\n{title}\n\n| row | {unit}/s | step time vs the first row |\n|---|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {samples / t:.1f} | {t / first:.3f}x |")

# ----------------------------------------------------------------------------- the BLIP captioner

BLIP_ROWS = {
    'dense, no gate': ['--gate', 'off', '--sparsity', '0'],
    'gate (kv) only': ['--sparsity', '0'],
    'sparsity 0.7 only': ['--gate', 'off', '--sparsity', '0.7'],
    'gate + 0.7 (the default)': [],
    'gate + 0.7, latents': ['--image_input', 'latents'],
}


def blip_train_step(argv, device, dtype):
    """One optimizer step of blip_gated_sparse's training loop on a fixed ShapesWorld batch
    (batch size, sizes and lr from the shapes preset and argv) -> a function that runs it."""
    cfg = common.parse_config(bgs.Config, bgs.PRESETS, argv, stem=bgs.METHOD)
    bgs.check_config(cfg)
    world = ShapesWorld(seed=0, image_size=cfg.image_size)
    dataset = build_dataset(cfg, 'train', world, image_input=cfg.image_input,
                            max_images=cfg.batch_size)
    tokenizer = bgs.decoder_tokenizer(cfg.text_backbone)
    batch = collate([dataset[i] for i in range(cfg.batch_size)], tokenizer, cfg.max_len)
    vision = (backbones.load_backbone(cfg.vision_backbone, 'vision')
              if cfg.image_input == 'pixels' else None)
    text = backbones.load_backbone(cfg.text_backbone, 'mlm')
    torch.manual_seed(0)
    model = bgs.Captioner(cfg, tokenizer, vision, text).to(device).train()
    optimizer = torch.optim.AdamW(common.param_groups(model, cfg.weight_decay), lr=cfg.lr)
    run = common.Run(device=device, dtype=dtype)

    def step():
        with run.autocast():
            loss = bgs.caption_loss(model, batch, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, cfg.batch_size


def bench_blip(args, device, dtype):
    steps = {name: blip_train_step(argv, device, dtype) for name, argv in BLIP_ROWS.items()}
    seconds = interleaved({name: step for name, (step, _) in steps.items()}, args.rounds)
    samples = next(iter(steps.values()))[1]
    print_table(f"blip_gated_sparse training step, {samples} captions, median of {args.rounds} "
                f"interleaved rounds ({device}, {dtype}, {torch.get_num_threads()} threads)",
                seconds, samples, 'captions')


# ----------------------------------------------------------------------------- against Hugging Face
# The same architecture and weights on both sides: each project module is built from the HF model it
# is timed against (vit_from_hf, bert_from_hf, Captioner from a BlipForConditionalGeneration).
WIDTHS = {  # tiny: the built-in backbones' widths and images; base: ViT-B/16 and BERT-base
    'tiny': (dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512), dict(image_size=64, patch_size=8), 64),
    'base': (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072), dict(image_size=224, patch_size=16), 8),
}


def fwd_bwd(forward):  # a function that runs forward, then backward of a scalar of its output
    return lambda: forward().float().pow(2).mean().backward()


def hf_pairs(size, device):
    """{row: (ours, HF's)}: vision tower and text encoder forward+backward, one captioning train
    step (gate off and sparsity 0, then the default gate + 0.7 against the same HF step), and beam
    search (3 beams, 16 new tokens) with the image keys and values cached."""
    width, image, batch = WIDTHS[size]
    torch.manual_seed(0)
    pixels = torch.randn(batch, 3, image['image_size'], image['image_size'], device=device)
    vit_hf = transformers.ViTModel(transformers.ViTConfig(**width, **image),
                                   add_pooling_layer=False)
    vit = backbones.vit_from_hf(vit_hf)
    tokenizer = backbones.build_tokenizer(0 if size == 'tiny' else 30524)
    words = torch.randint(5, len(tokenizer), (batch, 32), device=device)   # text encoder input
    padding = backbones.padding_mask(torch.ones_like(words))
    bert_hf = transformers.BertModel(transformers.BertConfig(**width, vocab_size=len(tokenizer)),
                                     add_pooling_layer=False)
    embeddings, layers, _, _ = backbones.bert_from_hf(bert_hf)

    def bert():
        x = embeddings(words)
        for layer in layers:
            x = layer(x, padding)
        return x
    special = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    blip_hf = transformers.BlipForConditionalGeneration(transformers.BlipConfig(
        vision_config=dict(width, **image), text_config=dict(
            width, vocab_size=len(tokenizer), encoder_hidden_size=width['hidden_size'], **special)))
    captioners = {}
    for name, argv in (('plain', ['--gate', 'off', '--sparsity', '0']), ('default', [])):
        cfg = common.parse_config(bgs.Config, bgs.PRESETS, argv + [
            '--image_size', str(image['image_size'])], stem=bgs.METHOD)
        captioners[name] = bgs.Captioner(cfg, tokenizer, blip_hf.vision_model,
                                         blip_hf.text_decoder).to(device)
    for module in (vit_hf, vit, bert_hf, embeddings, layers, blip_hf):
        module.to(device)
    ids, mask, labels = (t.to(device) for t in captioners['plain'].tokenize(
        ['a large red circle to the left of a small blue square'] * batch))
    prompt = captioners['plain'].tokenize([''] * batch)[0].to(device)        # [DEC] prompt [SEP]

    def hf_step():
        blip_hf(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                labels=labels).loss.backward()

    def hf_beam():
        blip_hf.generate(pixel_values=pixels, input_ids=prompt.clone(), num_beams=3,
                         max_new_tokens=16, min_new_tokens=1, early_stopping=True)
    beam = lambda model: torch.no_grad()(lambda: model.generate(model.encode_image(pixels)))
    return {
        'vision tower fwd+bwd': (fwd_bwd(lambda: vit(pixels)),
                                 fwd_bwd(lambda: vit_hf(pixel_values=pixels).last_hidden_state)),
        'text encoder fwd+bwd': (fwd_bwd(bert), fwd_bwd(
            lambda: bert_hf(input_ids=words).last_hidden_state)),
        'captioning step, gate off, sparsity 0': (
            lambda: captioners['plain'](pixels, ids, mask, labels).backward(), hf_step),
        'captioning step, gate kv + sparsity 0.7': (
            lambda: captioners['default'](pixels, ids, mask, labels).backward(), hf_step),
        'beam search (3 beams, 16 tokens)': (beam(captioners['plain']), hf_beam),
    }, batch


def bench_hf(args, device, dtype):
    print(f"the project against Hugging Face, median of {args.rounds} interleaved rounds "
          f"({device}, fp32, {torch.get_num_threads()} threads)\n\n"
          f"| size | row | batch | project ms | HF ms | ratio |\n|---|---|---|---|---|---|")
    for size in args.sizes.split(','):
        pairs, batch = hf_pairs(size, device)
        for row, (ours, theirs) in pairs.items():
            t = interleaved({'ours': ours, 'hf': theirs}, args.rounds, warmup=1)
            print(f"| {size} | {row} | {batch} | {t['ours'] * 1e3:.1f} | {t['hf'] * 1e3:.1f} | "
                  f"{t['ours'] / t['hf']:.2f} |", flush=True)


# ----------------------------------------------------------------------------- ALBEF + EPIC

ALBEF_ROWS = {
    'ALBEF': ['--epic', 'none'],
    '+ ITC on random tokens': ['--epic', 'random'],
    '+ EPIC, Grad-CAM, sampled (the default)': [],
    '+ EPIC, Grad-CAM, top-k': ['--mask_temperature', '0'],
    '+ E-PITC': ['--prune_keep', '0.5'],
}


def albef_model(argv, device, dtype):
    """albef_epic's model, optimizer and one fixed ShapesWorld batch (shapes preset + argv), and
    a function that runs one optimizer step of its training loop on that batch."""
    cfg = common.parse_config(ae.Config, ae.PRESETS, argv, stem=ae.METHOD)
    ae.check_config(cfg)
    world = ShapesWorld(seed=0, image_size=cfg.image_size)
    dataset = build_dataset(cfg, 'train', world, max_images=cfg.batch_size)
    tokenizer = backbones.load_tokenizer(cfg.text_backbone)
    batch = ae.pair_labels(collate([dataset[i] for i in range(cfg.batch_size)], tokenizer,
                                   cfg.max_len), world)
    batch = common.to_device(batch, device)
    torch.manual_seed(0)
    model = ae.AlbefEpic(cfg, backbones.load_backbone(cfg.vision_backbone, 'vision'),
                         backbones.load_backbone(cfg.text_backbone, 'mlm'),
                         tokenizer).to(device).train()
    optimizer = ae.build_optimizer(model, cfg)
    run = common.Run(device=device, dtype=dtype)

    def step():
        with run.autocast():
            loss = model(batch, alpha=cfg.alpha)['loss']
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, batch, run, step


def bench_albef(args, device, dtype):
    steps = {name: albef_model(argv, device, dtype)[3] for name, argv in ALBEF_ROWS.items()}
    seconds = interleaved(steps, args.rounds)
    print_table(f"albef_epic training step, 64 pairs, median of {args.rounds} interleaved rounds "
                f"({device}, {dtype}, {torch.get_num_threads()} threads)", seconds, 64, 'pairs')


def consistency_pass(model, batch, run, keep):
    """EPIC's consistency pass alone: the text encoder and the fusion on the caption, the head,
    BCE and backward into the image tokens, against all patches or (keep < 1) the top ones by
    the teacher ViT's [CLS] attention, ranking and gather included."""
    S, ids, mask = model.student, batch['input_ids'], batch['attention_mask']
    with torch.no_grad(), run.autocast():
        image_embeds = S.encode_image(batch['image'])                           # (B, 1+N, Dv)
        _, patch_scores = model.teacher.encode_image_ranked(batch['image'])
    labels = torch.ones(ids.shape, device=ids.device)

    def run_pass():
        with run.autocast():
            context = image_embeds.detach().requires_grad_()
            if keep < 1:
                context = ae.prune_patches(context, patch_scores, keep)
            fused = S.fuse(S.encode_text(ids, mask), mask, context)
            logits = model.consistency_head(fused).squeeze(-1).float()
        F.binary_cross_entropy_with_logits(logits, labels).backward()
    return run_pass


def bench_epitc(args, device, dtype):
    for image_size in map(int, args.image_sizes.split(',')):
        n, rows, kinds = (image_size // 8) ** 2, {}, ('consistency pass', 'training step')
        for keep in (1.0, 0.5):
            model, batch, run, step = albef_model(['--image_size', str(image_size),
                                                   '--prune_keep', str(keep)], device, dtype)
            rows[f'{kinds[0]}, {math.ceil(keep * n)} of {n} patches'] = consistency_pass(
                model, batch, run, keep)
            rows[f'{kinds[1]}, --prune_keep {keep:g}'] = step
        rows = {name: rows[name] for kind in kinds for name in rows if name.startswith(kind)}
        seconds = interleaved(rows, args.rounds)
        print(f"\nalbef_epic at {image_size} px, 64 pairs, median of {args.rounds} interleaved "
              f"rounds ({device}, {dtype}, {torch.get_num_threads()} threads)\n\n"
              f"| row | ms | against the first row of its kind |\n|---|---|---|")
        for name, t in seconds.items():
            first = seconds[next(n for n in rows if n.startswith(name.split(',')[0]))]
            print(f"| {name} | {t * 1e3:.1f} | {t / first:.3f}x |", flush=True)


BENCHES = {'blip': bench_blip, 'hf': bench_hf, 'albef': bench_albef, 'epitc': bench_epitc}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('bench', choices=sorted(BENCHES))
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    parser.add_argument('--sizes', default='tiny,base', help="hf: widths to time (tiny, base)")
    parser.add_argument('--image_sizes', default='64,128', help="epitc: image sizes in pixels")
    args = parser.parse_args(argv)
    # randomly initialised models make denormal gradients, which a CPU computes several times
    # slower (3x in the captioning step): flushed to zero, for every row alike
    torch.set_flush_denormal(True)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    BENCHES[args.bench](args, torch.device(args.device), getattr(torch, args.dtype))


if __name__ == '__main__':
    main()
