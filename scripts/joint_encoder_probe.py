"""Can the conv image branch's encoder read an attribute? A supervised check, no VAE.

Trains the encoder of ``ConvImageBranch`` (the ``joint_shapes`` options: derived and chroma
inputs, one full-resolution layer, z from the 4x4 map) with a linear layer on the mean of
q(z | x) as a plain classifier of one captioned attribute, and prints test accuracy, split by
background at level 5. If it learns here but not inside the joint VAE, the VAE's training
signal is what fails, not the network (README, ladder, session 9).

    python scripts/joint_encoder_probe.py --level 5 --attribute shape --steps 1000
    python scripts/joint_encoder_probe.py --level 5 --no-chroma
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from jointgen.data.shapes import ShapesDataModule
from jointgen.models.joint import ConvImageBranch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", type=int, default=5)
    ap.add_argument("--attribute", default="shape")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--no-chroma", action="store_true", help="without the chroma channels")
    ap.add_argument("--data-dir", default="data/shapes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dm = ShapesDataModule(
        data_dir=args.data_dir, level=args.level, num_train=20000, num_val=500,
        num_test=1000, batch_size=args.batch,
    )  # fmt: skip
    dm.setup()
    names = list(dm.attr_names)
    if args.attribute not in names:
        raise SystemExit(f"--attribute must be one of {names} at level {args.level}")
    col = names.index(args.attribute)
    train, test = dm.datasets["train"], dm.datasets["test"]
    classes = dm.attr_cardinalities[col]
    net = ConvImageBranch(
        32, 3, 32, 0, 32, derived_inputs=True, full_res_convs=1, decoder_coords=True,
        likelihood="gaussian", z_from_map=True, chroma_inputs=not args.no_chroma,
    )  # fmt: skip
    head = nn.Linear(net.z_dim, classes)
    params = [p for n, p in net.named_parameters() if not n.startswith("decoder")]
    opt = torch.optim.Adam(params + list(head.parameters()), lr=args.lr)
    x_test, a_test = test.images[:500].float() / 255, test.attrs[:500, col]
    dark = test.attrs[:500, names.index("background")] == 1 if "background" in names else None

    t0 = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train.images), (args.batch,))
        q, _ = net.expert(train.images[idx].float() / 255)
        loss = nn.functional.cross_entropy(head(q.loc), train.attrs[idx, col])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                right = (head(net.expert(x_test)[0].loc).argmax(1) == a_test).float()
            msg = f"step {step} ({time.time() - t0:.0f} s)  {args.attribute} {right.mean():.2f}"
            if dark is not None:
                msg += f"  light {right[~dark].mean():.2f}  dark {right[dark].mean():.2f}"
            print(msg, flush=True)


if __name__ == "__main__":
    main()
