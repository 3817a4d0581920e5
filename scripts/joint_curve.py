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
from jointgen.eval.classifier import train_attribute_classifier
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
    ap.add_argument("--hidden", type=int, default=32, help="conv branch hidden channels")
    ap.add_argument("--w-dim", type=int, default=32, help="private image latent size")
    ap.add_argument("--z-dim", type=int, default=32)
    ap.add_argument("--txt-w-dim", type=int, default=8, help="private caption latent size")
    ap.add_argument("--derived", action="store_true", help="saturation/coordinate inputs")
    ap.add_argument("--full-res", type=int, default=0, help="full-resolution conv layers")
    ap.add_argument("--scale-mode", default="learned", help="learned | fixed | per_pixel")
    ap.add_argument("--cosine", action="store_true", help="cosine lr decay to 0 over --steps")
    ap.add_argument("--classifier", action="store_true", help="also read c2i with the CNN")
    ap.add_argument("--likelihood", default="laplace", help="laplace | gaussian")
    ap.add_argument("--kl-align", default="", help="e.g. img: KL-match q_txt to q_img")
    ap.add_argument("--kl-align-weight", type=float, default=1.0)
    ap.add_argument("--kl-align-direction", default="forward", help="forward | reverse")
    ap.add_argument("--decoder-coords", action="store_true", help="CoordConv decoder")
    ap.add_argument("--z-from-map", action="store_true", help="z also reads the 4x4 map")
    ap.add_argument("--chroma", action="store_true", help="encoder also reads x - mean_c(x)")
    ap.add_argument("--shared-recon", default="", help="e.g. img: also decode from (z, w ~ r)")
    ap.add_argument("--shared-recon-weight", type=float, default=1.0)
    ap.add_argument("--image-decoder", default="upsample", help="upsample | broadcast")
    ap.add_argument("--broadcast-channels", type=int, default=32)
    ap.add_argument("--broadcast-layers", type=int, default=3)
    ap.add_argument("--cross-frozen", default="", help="e.g. img: no decoder grad from cross")
    ap.add_argument("--caption-prior", type=int, default=0, help="mixture p(z | caption) K")
    ap.add_argument("--joint-prior", type=int, default=0, help="mixture for joint sampling K")
    ap.add_argument("--seed", type=int, default=0, help="torch seed (initialisation, batches)")
    ap.add_argument("--save", default=None, help="save the network's state_dict here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dm = ShapesDataModule(
        data_dir=args.data_dir, level=args.level, num_train=20000, num_val=500,
        num_test=max(500, args.num_eval), batch_size=args.batch,
        paraphrase_rate=args.paraphrase_rate,
    )  # fmt: skip
    dm.setup()
    image = ConvImageBranch(
        32, 3, args.z_dim, args.w_dim, args.hidden, convs_per_level=args.convs_per_level,
        scale=args.scale_mode, derived_inputs=args.derived, full_res_convs=args.full_res,
        decoder_coords=args.decoder_coords, likelihood=args.likelihood,
        z_from_map=args.z_from_map, chroma_inputs=args.chroma, decoder=args.image_decoder,
        broadcast_channels=args.broadcast_channels, broadcast_layers=args.broadcast_layers,
    )  # fmt: skip
    text = TextBranch(len(dm.vocab), 16, args.z_dim, args.txt_w_dim, decoder=args.decoder)
    scale = args.scale  # a mode name, or explicit "img:1,txt:1000"
    if ":" in scale:
        scale = {k: float(v) for k, v in (kv.split(":") for kv in scale.split(","))}
    frozen = tuple(m for m in args.cross_frozen.split(",") if m)
    net = JointVAE(
        image, text, fusion=args.fusion, likelihood_scale=scale, cross_frozen=frozen,
        kl_align=tuple(m for m in args.kl_align.split(",") if m),
        kl_align_weight=args.kl_align_weight, kl_align_direction=args.kl_align_direction,
        shared_recon=tuple(m for m in args.shared_recon.split(",") if m),
        shared_recon_weight=args.shared_recon_weight,
        caption_prior_components=args.caption_prior, joint_prior_components=args.joint_prior,
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = None
    if args.cosine:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    test = dm.datasets["test"]
    n = args.num_eval
    images, tokens, attrs = test.images[:n].float() / 255, test.tokens[:n], test.attrs[:n]

    def decode(t: torch.Tensor) -> list[str]:
        return [dm.vocab.decode(row.tolist()) for row in t]

    clf = None
    if args.classifier:
        clf, acc = train_attribute_classifier(args.level)
        print("attribute classifier accuracy", acc, flush=True)

    def evaluate(step: int, terms: dict) -> None:
        net.eval()
        with torch.no_grad():
            gen = net.caption_to_image(tokens)
            c2i = cross_coherence_txt2img(gen, attrs, args.level)
            if args.w_dim:
                aux = cross_coherence_txt2img(
                    net.caption_to_image(tokens, aux_prior=True), attrs, args.level
                )
                print(f"  c2i with w ~ r(w): strict {aux['strict']:.3f}", flush=True)
            if net.caption_prior is not None:
                z = net.unimodal_posterior("txt", tokens).rsample(1)[0]
                plain = cross_coherence_txt2img(net.branches["img"].generate(z), attrs, args.level)
                print(f"  c2i from q(z | caption): strict {plain['strict']:.3f}", flush=True)
            if clf is not None:
                c2c = cross_coherence_txt2img(
                    gen, attrs, args.level, method="classifier", classifier=clf
                )
                print(f"  c2i by classifier: strict {c2c['strict']:.3f}", flush=True)
            rec = cross_coherence_txt2img(
                net.branches["img"].reconstruct(images), attrs, args.level
            )
            accs = " ".join(f"{k[4:]} {v:.2f}" for k, v in rec.items() if k.startswith("acc/"))
            print(f"  reconstruction strict {rec['strict']:.3f} [{accs}]", flush=True)
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
            if sched is not None:
                sched.step()
            step += 1
            if step % args.every == 0 or step == args.steps:
                evaluate(step, {k: float(v) for k, v in out.terms.items()})
            if step >= args.steps:
                break
    if args.save:
        torch.save(net.state_dict(), args.save)


if __name__ == "__main__":
    main()
