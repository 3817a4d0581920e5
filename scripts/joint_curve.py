"""Learning curve of the joint VAE's coherence on the shapes, with a plain training loop.

A quick way to compare settings outside Lightning: trains ``JointVAE`` (conv image branch)
and prints caption-to-image, image-to-caption and joint strict coherence (and per attribute)
on test pairs every ``--every`` steps. The figures in the README's joint-model section come
from this script.

    python scripts/joint_curve.py --steps 4000 --decoder autoregressive --scale auto_upweight
    python scripts/joint_curve.py --decoder nonautoregressive --scale auto_dim_ratio
"""

from __future__ import annotations

import argparse
import time

import torch

from jointgen.data.shapes import ShapesDataModule
from jointgen.eval import cross_coherence_img2txt, cross_coherence_txt2img, joint_coherence
from jointgen.models.joint import ConvImageBranch, JointVAE, TextBranch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fusion", default="mmvae_plus")
    ap.add_argument("--scale", default="auto_upweight")
    ap.add_argument("--decoder", default="autoregressive")
    ap.add_argument("--paraphrase-rate", type=float, default=0.5)
    ap.add_argument("--convs-per-level", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=0.3, help="KL warm-up share of the steps")
    ap.add_argument("--num-eval", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default="data/shapes")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm = ShapesDataModule(
        data_dir=args.data_dir, level=args.level, num_train=20000, num_val=500,
        num_test=max(500, args.num_eval), batch_size=args.batch,
        paraphrase_rate=args.paraphrase_rate,
    )  # fmt: skip
    dm.setup()
    image = ConvImageBranch(32, 3, 32, 32, 32, convs_per_level=args.convs_per_level)
    text = TextBranch(len(dm.vocab), 16, 32, 8, decoder=args.decoder)
    net = JointVAE(image, text, fusion=args.fusion, likelihood_scale=args.scale)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    test = dm.datasets["test"]
    n = args.num_eval
    images, tokens, attrs = test.images[:n].float() / 255, test.tokens[:n], test.attrs[:n]

    def decode(t: torch.Tensor) -> list[str]:
        return [dm.vocab.decode(row.tolist()) for row in t]

    def evaluate(step: int, terms: dict) -> None:
        net.eval()
        with torch.no_grad():
            c2i = cross_coherence_txt2img(net.caption_to_image(tokens), attrs, args.level)
            i2c = cross_coherence_img2txt(decode(net.image_to_caption(images)), attrs, args.level)
            j = net.sample_joint(200)
            joint = joint_coherence(j["image"], decode(j["tokens"]), args.level)
        net.train()
        per = lambda r: " ".join(f"{k[4:]} {v:.2f}" for k, v in r.items() if k.startswith("acc/"))  # noqa: E731
        print(
            f"step {step} ({time.time() - t0:.0f} s)  c2i strict {c2i['strict']:.3f} [{per(c2i)}]"
            f"  i2c strict {i2c['strict']:.3f} [{per(i2c)}] parsed {i2c['parsed']:.2f}"
            f"  joint strict {joint['strict']:.3f}  kl/z {terms['kl/z']:.1f}",
            flush=True,
        )

    print("likelihood scales", net.likelihood_scales, flush=True)
    step, t0 = 0, time.time()
    while step < args.steps:
        for batch in dm.train_dataloader():
            out = net(batch, min(1.0, (step + 1) / max(1.0, args.warmup * args.steps)))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                evaluate(step, {k: float(v) for k, v in out.terms.items()})
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
