"""How well can an image decoder draw the shapes from a trained joint VAE's image latent?

Freezes the image encoder of a trained ``joint_shapes`` checkpoint, takes its posterior means
z for the training images, and trains a fresh decoder on them alone (Laplace likelihood with a
learned per-channel scale, Adam) for ``--steps`` steps; then reads the reconstructions of test
images with the analytic attribute extractor. Separates "z does not carry the shape" from
"the decoder cannot draw it": the README's joint-model findings come from this script.

    python scripts/joint_decoder_probe.py CKPT --arch base coord --steps 1500
"""

from __future__ import annotations

import argparse
import time

import torch

from jointgen.data.shapes import ShapesDataModule
from jointgen.eval import cross_coherence_txt2img
from jointgen.models.joint import ConvImageBranch
from jointgen.utils.checkpoint import model_from_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--arch", nargs="+", default=["base"], help="decoder variants (see below)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--num-eval", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    module, cfg = model_from_checkpoint(args.ckpt)
    enc_branch = module.net.branches["img"].eval()
    dm = ShapesDataModule(
        data_dir=cfg.data.data_dir, level=cfg.data.level, num_train=cfg.data.num_train,
        num_val=cfg.data.num_val, num_test=cfg.data.num_test,
    )  # fmt: skip
    dm.setup()
    tr, te = dm.datasets["train"], dm.datasets["test"]

    @torch.no_grad()
    def zmeans(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([enc_branch.expert(b.float() / 255)[0].mean for b in images.split(256)])

    t0 = time.time()
    z_tr, z_te = zmeans(tr.images), zmeans(te.images[: args.num_eval])
    a_te = te.attrs[: args.num_eval]
    print(f"encoded {len(z_tr)} train images in {time.time() - t0:.0f} s", flush=True)
    kw = dict(cfg.model.net.image)
    for arch in args.arch:
        torch.manual_seed(0)
        opts = {k: kw[k] for k in ("hidden_channels", "full_res_convs", "derived_inputs")}
        opts.update(ARCHS[arch])
        dec = ConvImageBranch(kw["image_size"], 3, z_tr.shape[1], 0, **opts)
        params = [p for n, p in dec.named_parameters() if not n.startswith(("encoder", "head"))]
        opt = torch.optim.Adam(params, lr=args.lr)
        n_par = sum(p.numel() for p in params)
        t0 = time.time()
        for _ in range(args.steps):
            idx = torch.randint(0, len(z_tr), (args.batch,))
            x = tr.images[idx].float() / 255
            mean, log_scale = dec.decode_params(z_tr[idx])
            loss = -dec.pixel_log_prob(x, mean, log_scale).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            rec = dec.decode(z_te)
        r = cross_coherence_txt2img(rec, a_te, cfg.data.level)
        secs = (time.time() - t0) / args.steps
        print(
            f"{arch:>12}: recon strict {r['strict']:.3f} shape {r['acc/shape']:.2f}  "
            f"loss {loss.item():.0f}  {n_par / 1e3:.0f}k params  {secs * 1e3:.0f} ms/step",
            flush=True,
        )


ARCHS = {
    "base": {},
    "coord": {"decoder_coords": True},
    "wide": {"hidden_channels": 64},
    "convs1": {"convs_per_level": 1},
    "coord_convs1": {"decoder_coords": True, "convs_per_level": 1},
    "gaussian": {"likelihood": "gaussian"},
    "coord_gaussian": {"decoder_coords": True, "likelihood": "gaussian"},
    "per_pixel": {"scale": "per_pixel"},
    "coord_per_pixel": {"decoder_coords": True, "scale": "per_pixel"},
    "wide_gaussian": {"decoder_coords": True, "likelihood": "gaussian", "hidden_channels": 64},
    "broadcast": {"decoder": "broadcast", "likelihood": "gaussian"},
    "broadcast64": {"decoder": "broadcast", "likelihood": "gaussian", "broadcast_channels": 64},
}

if __name__ == "__main__":
    main()
