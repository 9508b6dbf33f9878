"""Time ONE ConvNeXt V2 block, forward + backward, per backend, side by side (interleaved rounds,
median), to compare with the whole-step numbers of `fcmae bench` (README.md, "Performance").

    python benchmarks/blocks.py                       # stage shapes 128x56, 256x28, 512x14; N=16, 60% masked
    python benchmarks/blocks.py --batch 8 --rounds 3 --shapes 128x56 512x14

Backends: dense (the dense-masked reference, `Block.forward(x, visible)`), sparse (the fast path,
`Block.forward(rows, VisibleRows)`: depthwise conv dense on the scattered channels-last map,
everything else on visible rows), and minkowski when MinkowskiEngine is installed
(`Block.forward(rows, MinkowskiRows)`: its submanifold channelwise conv, the same pointwise rows).
"""
import argparse
import statistics
import time

import torch

from fcmae.encoders.convnextv2 import Block
from fcmae.encoders.rows import VisibleRows, visible_patches
from fcmae.masking import num_visible, random_mask, upsample_mask


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["128x56", "256x28", "512x14"], help="CxH of the stage")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mask-grid", type=int, default=7,
                   help="mask side (the last stage of a 224 image: 7); H must be a multiple")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import MinkowskiEngine as ME

        from fcmae.encoders.minkowski import MINKOWSKI, MinkowskiRows
    except ImportError:
        ME = None
    torch.manual_seed(0)
    print(f"one block fwd+bwd, N={args.batch}, mask {args.mask_ratio}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'C, H':>10} {'dense s':>9} {'sparse s':>9} {'x dense':>8} {'minkowski s':>12} {'x dense':>8}")
    for shape in args.shapes:
        c, h = map(int, shape.split("x"))
        block = Block(c)
        with torch.no_grad():
            block.grn.gamma.normal_(0, 0.3)
            block.grn.beta.normal_(0, 0.3)
        grid = args.mask_grid  # the mask lives on the last stage (224/32 = 7); repeated up to h
        mask = random_mask(args.batch, grid, grid, args.mask_ratio)
        visible = upsample_mask(mask == 0, h // grid)
        keep = visible.unsqueeze(-1).float()
        per_sample = num_visible(grid * grid, args.mask_ratio)
        rows = VisibleRows(*visible_patches(mask, per_sample), mask.shape, h // grid, per_sample)
        x = torch.randn(args.batch, c, h, h) * keep.permute(0, 3, 1, 2)
        x_rows = rows.gather(x.contiguous(memory_format=torch.channels_last))
        g_dense = torch.randn_like(x) * keep.permute(0, 3, 1, 2)
        g_rows = rows.gather(g_dense.contiguous(memory_format=torch.channels_last))

        def dense():
            xi = x.clone().requires_grad_()
            block(xi, keep).backward(g_dense)

        def sparse():
            xi = x_rows.clone().requires_grad_()
            block(xi, rows).backward(g_rows)

        runs = {"dense": dense, "sparse": sparse}
        if ME is not None:
            coords = visible.nonzero().int().contiguous()  # raster order: the rows in that order
            raster = visible.reshape(-1).nonzero().squeeze(1)
            x_points = x.permute(0, 2, 3, 1).reshape(-1, c)[raster]
            g_points = g_dense.permute(0, 2, 3, 1).reshape(-1, c)[raster]

            def minkowski():
                xi = x_points.clone().requires_grad_()
                layout = MinkowskiRows(MINKOWSKI, ME, ME.SparseTensor(xi, coordinates=coords), args.batch)
                block(xi, layout).backward(g_points)

            runs["minkowski"] = minkowski
        times = {k: [] for k in runs}
        for f in runs.values():
            f()  # warm-up
        for r in range(args.rounds):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
                block.zero_grad(set_to_none=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        mk = (f"{med['minkowski']:>12.3f} {med['dense'] / med['minkowski']:>7.2f}x" if "minkowski" in med
              else f"{'-':>12} {'-':>8}")
        print(f"{c:>5}, {h:<3} {med['dense']:>9.3f} {med['sparse']:>9.3f} {med['dense'] / med['sparse']:>7.2f}x {mk}")


if __name__ == "__main__":
    main()
