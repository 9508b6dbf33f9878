"""`fcmae export`: weights in the public release's dense ConvNeXt V2 layout.

    fcmae export runs/base                     # -> runs/base/encoder.safetensors
    fcmae export runs/base/checkpoints/last.ckpt --output base.pth
    fcmae export runs/ft-base --ema            # a fine-tuning run -> the full classifier (EMA weights)
    fcmae export runs/base --hub hub/base      # timm's hub layout + a model card (fcmae/hub.py)

A pre-training checkpoint gives the encoder only (downsample_layers.*, stages.*), dense-converted;
a fine-tuning checkpoint gives the whole classifier, norm.* and head.* included, and its class
names. The release's own checkpoints (MinkowskiEngine layout) convert too. `.safetensors`
(default) carries metadata: model size, in_chans, input size, steps and the run's configuration
(values JSON-encoded); `.pth` holds {"model": weights, "meta": metadata}, like the release's
files. timm's `convnextv2_<size>` loads either through its checkpoint filter. Reading and
writing are fcmae.checkpoints'. `--hub DIR` writes a folder that
`timm.create_model("local-dir:DIR", pretrained=True)` loads instead, with a model card written
from the run (fcmae/hub.py), ready to upload.
"""
from typing import Optional

from jsonargparse import ArgumentParser

from fcmae.checkpoints import export_weights
from fcmae.errors import UserError
from fcmae.hub import export_hub


def build_parser():
    p = ArgumentParser(prog="fcmae export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=str, help="a run directory (its checkpoints/last.ckpt) or a checkpoint file")
    p.add_argument("--output", type=Optional[str], default=None,
                   help="file to write, .safetensors or .pth (default: <run dir>/encoder.safetensors, "
                        "or classifier.safetensors for fine-tuning runs)")
    p.add_argument("--hub", type=Optional[str], default=None,
                   help="write a folder in timm's hub layout instead (config.json, model.safetensors, a README.md "
                        "model card from the run): timm.create_model('local-dir:DIR', pretrained=True) loads it")
    p.add_argument("--ema", action="store_true", help="fine-tuning checkpoints: take the EMA weights")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a torch file that needs full unpickling: runs code from the file, so only for "
                        "files you trust")
    return p


def run(cfg):
    if cfg.hub is not None:
        if cfg.output is not None:
            raise UserError("--output and --hub both name what to write: pass one (--hub DIR writes a folder)")
        folder = export_hub(cfg.source, cfg.hub, cfg.ema, cfg.trust_checkpoint)
        print(f"wrote {folder} (config.json, model.safetensors, README.md): "
              f"timm.create_model('local-dir:{folder}', pretrained=True) loads it")
        return
    path = export_weights(cfg.source, cfg.output, cfg.ema, cfg.trust_checkpoint)
    print(f"wrote {path}")
