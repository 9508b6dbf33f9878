"""Weights as a folder in timm's hub layout, with a model card written from the run.

    DIR/config.json          timm's model config: architecture, num_classes, num_features,
                             model_args (in_chans; depths and dims of a custom size) and
                             pretrained_cfg (input size, mean/std, crop, interpolation), and the
                             class names as `label_names` for a classifier
    DIR/model.safetensors    the weights under timm's own names (an encoder: num_classes 0), and
                             our metadata (kind, input size, steps, classes, the run's config)
    DIR/README.md            the model card: what it was trained on and how, its steps, final loss,
                             kNN curve (knn.png) and latest reconstructions (reconstruction.png),
                             and how to load it with timm or fcmae and upload it

`timm.create_model("local-dir:DIR", pretrained=True)` loads it (and once uploaded,
"hf-hub:USER/NAME"); fcmae's commands read DIR/model.safetensors like any weights file. Every
file is written atomically (fcmae/files.py); nothing is downloaded.
"""
import json
import tempfile
from pathlib import Path

from fcmae.checkpoints import read_weights
from fcmae.data.transforms import STATS
from fcmae.errors import SettingError
from fcmae.files import atomic_write, save_figure, write_atomic
from fcmae.rundir import RunDir, read_scalars, run_dir_of

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
KNN_PLOT = "knn.png"
RECONSTRUCTION = "reconstruction.png"
# What timm's convnextv2 pretrained_cfg says about the release's own weights, not about these.
RELEASE_ONLY = ("tag", "license", "origin_url", "hf_hub_id", "url", "file")


def timm_model(weights):
    """timm's ConvNeXt V2 holding `weights` (fcmae.checkpoints.Weights): `convnextv2_<size>`, or
    for a custom size its depths and dims as model arguments; num_classes 0 for an encoder (its
    head's LayerNorm keeps timm's initial values: an encoder has none)."""
    import timm
    from timm.models.convnext import checkpoint_filter_fn

    size = weights.model if isinstance(weights.model, str) else None
    extra = {} if size else {"depths": weights.model["depths"], "dims": weights.model["dims"]}
    model = timm.create_model(f"convnextv2_{size or 'atto'}", pretrained=False, num_classes=weights.num_classes,
                              in_chans=weights.in_chans, **extra)
    result = model.load_state_dict(checkpoint_filter_fn(weights.state, model), strict=False)
    allowed = set() if weights.num_classes else {"head.norm.weight", "head.norm.bias"}
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        raise SettingError(f"{weights.path} does not fit timm's convnextv2: "
                           f"{(sorted(set(result.missing_keys) - allowed) or result.unexpected_keys)[0]}")
    return model.eval()


def data_config(weights):
    """timm's preprocessing of these weights: the input size, normalization and eval crop they
    were trained with (more channels than an image has: .npy arrays, used as stored, so mean 0
    and std 1)."""
    size = weights.meta.get("input_size") or 224
    mean, std = STATS.get(weights.in_chans, ((0.0,) * weights.in_chans, (1.0,) * weights.in_chans))
    crop = weights.meta.get("crop_pct") or (224 / 256 if size < 384 else 1.0)
    return {"input_size": (weights.in_chans, size, size), "mean": tuple(mean), "std": tuple(std),
            "crop_pct": crop, "interpolation": "bicubic"}


def hub_config(model, weights):
    """config.json's content (a dict), as timm's save_config_for_hf writes it, with the release's
    own provenance fields dropped."""
    from timm.models._hub import save_config_for_hf

    labels = {"label_names": list(weights.classes)} if weights.classes else {}
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, Path(tmp) / CONFIG, model_config=labels, data_config=data_config(weights))
        config = json.loads((Path(tmp) / CONFIG).read_text())
    for key in RELEASE_ONLY:
        config["pretrained_cfg"].pop(key, None)
    return config


def export_hub(source, folder, ema=False, trust=False):
    """Checkpoint, export or run directory `source` -> `folder` in timm's hub layout with its
    model card; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SettingError(f"`hub` {folder} is a file, not a folder: pass a folder to write the model into")
    weights = read_weights(source, ema, trust)
    model = timm_model(weights)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "kind": "classifier" if weights.num_classes else "encoder",
            "input_size": weights.meta.get("input_size"), "crop_pct": weights.meta.get("crop_pct"),
            "steps": weights.meta.get("steps"), "ema": ema, "config": weights.meta.get("config") or {}}
    if weights.classes:
        meta["classes"] = weights.classes
    encoded = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata=encoded), mode=0o644)
    write_atomic(folder / CONFIG, json.dumps(hub_config(model, weights), indent=2) + "\n")
    write_atomic(folder / CARD, model_card(weights, folder, run_of(weights.path), source))
    return folder


def run_of(path):
    """The run directory a weights file came from (it holds config.yaml), or None."""
    run = RunDir(run_dir_of(path))
    return run if run.config.is_file() else None


# ----------------------------------------------------------------------------- the model card

def model_card(weights, folder, run, source):
    """README.md's text, from the weights' metadata and what the run directory holds (its
    losses, kNN rows and reconstruction grids), writing knn.png and reconstruction.png beside it."""
    config = weights.meta.get("config") or {}
    kind = "classifier" if weights.num_classes else "encoder"
    size = weights.model if isinstance(weights.model, str) else f"custom ({json.dumps(weights.model)})"
    steps = weights.meta.get("steps")
    lines = [f"# ConvNeXt V2-{size} {kind}, trained with fcmae", "",
             f"Exported by `fcmae export {source} --hub {folder}`.", "", "## Training", ""]
    lines += [f"- {label}: {value}" for label, value in training_facts(weights, config, steps, kind)]
    losses = read_scalars(run.tensorboard, "train/loss") if run else []
    if losses:
        lines.append(f"- final training loss: {losses[-1][1]:.4f} at step {losses[-1][0]} "
                     f"(first logged: {losses[0][1]:.4f} at step {losses[0][0]})")
    lines += knn_section(run, folder) + reconstruction_section(run, folder)
    lines += usage_section(weights, folder, kind)
    return "\n".join(lines) + "\n"


def training_facts(weights, config, steps, kind):
    """(label, value) lines: the recipe and data the run trained with."""
    facts = [("task", "FCMAE self-supervised pre-training (the encoder only)" if kind == "encoder" else
              "linear probe" if config.get("linear_probe") else "fine-tuning (classification)"),
             ("data", f"`{config['data']}`" if config.get("data") else "unknown"),
             ("input", f"{weights.in_chans} channels, {weights.meta.get('input_size') or '?'} px")]
    if config:
        facts += [("optimizer steps", steps), ("epochs", config.get("epochs")),
                  ("effective batch", config.get("effective_batch")), ("lr", config.get("lr")),
                  ("warmup epochs", config.get("warmup_epochs"))]
        if kind == "encoder":
            facts += [("mask ratio", config.get("mask_ratio")), ("norm-pix loss", config.get("norm_pix_loss"))]
    if weights.classes:
        facts.append(("classes", f"{len(weights.classes)}: {', '.join(weights.classes[:20])}"
                                  f"{', ...' if len(weights.classes) > 20 else ''}"))
    if weights.meta.get("top1") is not None:
        facts.append(("validation top-1", f"{weights.meta['top1']:.2f}%"))
    return [(label, value) for label, value in facts if value is not None]


def knn_section(run, folder):
    """The kNN monitor's rows as a table and knn.png, or nothing without them."""
    rows = []
    if run and run.metrics.is_file():
        rows = [json.loads(line) for line in run.metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "eval/knn_top1" in r]
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["eval/knn_top1"] for r in rows], marker="o")
    ax.set(xlabel="optimizer step", ylabel="kNN top-1 (%)", title="kNN monitor")
    ax.grid(alpha=0.3)
    save_figure(fig, folder / KNN_PLOT)
    plt.close(fig)
    table = ["| step | epoch | kNN top-1 | top-5 |", "|---:|---:|---:|---:|"]
    table += [f"| {r['step']} | {r['epoch']} | {r['eval/knn_top1']:.2f} | {r.get('eval/knn_top5', float('nan')):.2f} |"
              for r in rows]
    return ["", "## kNN monitor", "", "Weighted kNN top-1 of the frozen features on the run's labelled set "
            "(`--eval-data`), during training:", "", f"![kNN top-1]({KNN_PLOT})", "", *table]


def reconstruction_section(run, folder):
    """The run's latest reconstruction grid, copied beside the card, or nothing."""
    grids = sorted(run.reconstructions.glob("*.png")) if run else []
    if not grids:
        return []
    write_atomic(folder / RECONSTRUCTION, grids[-1].read_bytes())
    return ["", "## Reconstructions", "", f"Rows: images, the masked input, the reconstruction "
            f"({grids[-1].stem}):", "", f"![reconstructions]({RECONSTRUCTION})"]


def usage_section(weights, folder, kind):
    name = "classifier" if kind == "classifier" else "encoder"
    fcmae_use = (f"fcmae predict --checkpoint {folder}/{WEIGHTS} images/ --output predictions.csv"
                 if kind == "classifier" else
                 f"fcmae finetune --model {weights.model if isinstance(weights.model, str) else 'custom'} "
                 f"--data DIR --pretrained {folder}/{WEIGHTS}\n"
                 f"fcmae knn --checkpoint {folder}/{WEIGHTS} --data DIR")
    features = "logits = model(transform(image)[None])  # (1, num_classes)" if kind == "classifier" else \
        ("features = model.forward_features(x)  # (N, C, H/32, W/32): the encoder's last stage\n"
         "pooled = features.mean((2, 3))  # what fcmae's kNN monitor compares (model(x) adds timm's head "
         "LayerNorm, untrained here)")
    return ["", "## Use", "", "With timm:", "", "```python", "import timm",
            f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()',
            "cfg = timm.data.resolve_data_config({}, model=model)  # input size, mean/std, crop",
            "transform = timm.data.create_transform(**cfg)", features, "```", "", f"With fcmae (the {name}):", "",
            "```bash", fcmae_use, "```", "", "Uploading the folder (with network and a Hugging Face token), "
            "then loading it from anywhere:", "", "```python", "from huggingface_hub import HfApi",
            f'HfApi().upload_folder(folder_path="{folder}", repo_id="USER/NAME", repo_type="model")',
            'model = timm.create_model("hf-hub:USER/NAME", pretrained=True)', "```"]
