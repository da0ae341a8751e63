"""
Throughput of the FID Inception, input path included (uint8 images -> resize to 299 -> normalise -> forward), for
fid.py and for pytorch-fid, on the same machine, batch and device, interleaved so that machine noise hits both.

    python bench_fid.py --device cpu --batch-size 50 --size 256 --rounds 5 [--threads 1]

pytorch-fid is only needed here (pip install pytorch-fid); it is not a requirement of the repo. Both networks get the
same random weights: timing does not depend on them, and nothing is downloaded.
"""

import argparse
import time

import numpy as np
import torch

import fid


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batch-size', type=int, default=50)
    parser.add_argument('--size', type=int, default=256, help='input images are size x size uint8')
    parser.add_argument('--rounds', type=int, default=5, help='timed batches per method, after one warm-up each')
    parser.add_argument('--threads', type=int, help='CPU threads (default: torch\'s choice)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    state = fid.InceptionV3().state_dict()  # random weights in the standard layout

    ours = fid.InceptionV3()
    ours.load_state_dict(state)
    ours = ours.to(device, memory_format=torch.channels_last).eval()  # as fid.load_inception returns it
    methods = {'fid.py': lambda x: ours(fid.preprocess(x))}
    try:
        import pytorch_fid.inception as pf
    except ImportError:
        print('pytorch-fid is not installed (pip install pytorch-fid): timing fid.py alone')
    else:
        pf.load_state_dict_from_url = lambda *args, **kwargs: state  # its constructor would download the weights
        theirs = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
        # pytorch-fid resizes (F.interpolate) and normalises inside its forward; its DataLoader hands it contiguous
        # NCHW floats in [0, 1] (ToTensor, in loader workers, so that conversion is left out of its time here).
        # Convolutions follow their input's memory layout: the second row feeds it channels_last, as fid.py does.
        methods['pytorch-fid'] = lambda x: theirs(x)
        methods['pytorch-fid, channels_last input'] = lambda x: theirs(x.contiguous(memory_format=torch.channels_last))
    images = torch.randint(0, 256, (args.batch_size, args.size, args.size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    floats = images.permute(0, 3, 1, 2).float().div(255).contiguous()
    times = {name: [] for name in methods}
    with torch.inference_mode(), fid.full_float32(device):
        for r in range(args.rounds + 1):
            for name, run in methods.items():
                x = images if name == 'fid.py' else floats
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run(x.to(device))
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                if r > 0:  # round 0 is the warm-up (kernel selection, allocator)
                    times[name].append(time.perf_counter() - start)

    print(f'device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} '
          f'of {args.size}x{args.size} uint8, {args.rounds} rounds interleaved')
    print(f'{"method":<34} {"img/s median":>12} {"img/s best":>10} {"time / fid.py time":>18}')
    for name, t in times.items():
        ratio = np.median(np.array(t) / np.array(times['fid.py']))
        print(f'{name:<34} {args.batch_size / np.median(t):12.2f} {args.batch_size / np.min(t):10.2f} {ratio:18.2f}')
    print('(last column: median over rounds of the per-round ratio; rounds are interleaved, so it cancels most of '
          'the machine\'s slow and fast phases)')


if __name__ == '__main__':
    main()
