"""
bench.py — side-by-side timings. The rows of one comparison are built in one process and timed in
interleaved rounds (row 1, row 2, ..., row 1, row 2, ...), so a slow moment of the machine falls on
every row alike; a row's time is its median over the rounds, and the table gives each row against
the first.

    python bench.py blip                  # BLIP training step: dense, gate, top-k, default, latents
    python bench.py blip --rounds 30 --device cuda --dtype bfloat16
"""
import argparse
import statistics
import time

import torch

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


BENCHES = {'blip': bench_blip}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('bench', choices=sorted(BENCHES))
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: CUDA is not available')
    BENCHES[args.bench](args, torch.device(args.device), getattr(torch, args.dtype))


if __name__ == '__main__':
    main()
