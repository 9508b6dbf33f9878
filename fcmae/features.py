"""What an encoder's features say without fine-tuning: a weighted kNN classifier on pooled
features (`fcmae knn`, the pre-training monitor) and the paper's feature cosine distance
(`fcmae analyze`), and loading an encoder for them.

Features for kNN are the dense encoder's last stage, unmasked, global-average pooled (N, C_last),
then L2-normalized; nothing else (the final LayerNorm and the head are not part of a pre-trained
encoder). The classifier is the weighted kNN of DINO and the common self-supervised benchmarks:
cosine similarity to every labelled train feature, the k most similar vote for their class with
weight exp(similarity / T).
"""
import time

import torch
import torch.nn.functional as F

from fcmae.data.modules import loader
from fcmae.encoders import ConvNeXtV2
from fcmae.errors import SettingError, UserError
from fcmae.precision import autocast

# ----------------------------------------------------------------------------- feature collapse

def cosine_distance(x):
    """The paper's feature cosine distance of each image's activations.

    x (N, C, H, W) -> (N,): (1/C^2) sum_i sum_j (1 - cos(x_i, x_j)) / 2 over all channel pairs
    (diagonal included), x_i the HW-vector of channel i. The mean of the Gram matrix G of the
    L2-normalized channel vectors is ||sum_i x_i/|x_i| ||^2 / C^2, so the distance is
    (1 - mean(G)) / 2 without forming the C x C matrix: O(C HW) memory. An all-zero channel
    (dead) has cosine 0 with every channel, itself included.
    """
    v = F.normalize(x.flatten(2).float(), dim=-1)  # (N, C, HW), unit rows
    gram_mean = v.sum(1).square().sum(-1) / v.shape[1] ** 2  # (N,) = mean of v @ v^T
    return (1 - gram_mean) / 2


# ----------------------------------------------------------------------------- encoders and features

def dense_encoder(weights=None, model="atto", in_chans=3, seed=0):
    """A dense ConvNeXtV2 trunk (no head) in eval mode: with `weights` (fcmae.checkpoints.Weights)
    their encoder tensors, else a seeded random initialization (the floor to compare with)."""
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ConvNeXtV2(model, in_chans, num_classes=0).eval()
    encoder = ConvNeXtV2(weights.model, weights.in_chans, num_classes=0)
    load_trunk(encoder, weights.encoder, weights.path)
    return encoder.eval()


def load_encoder(checkpoint, random_init, model, in_chans, seed=0, trust=False):
    """(dense encoder, label, meta) for weights `checkpoint` (a run directory or weights file) or
    `random_init` (of size `model`); meta holds the checkpoint's kind, steps and training input
    size where known."""
    if random_init == (checkpoint is not None):
        raise SettingError("pass exactly one of `checkpoint` FILE_OR_RUN_DIR and `random_init`")
    if random_init:
        return dense_encoder(None, model, in_chans, seed), f"random init ({model})", {}
    from fcmae.checkpoints import read_weights
    weights = read_weights(checkpoint, trust=trust)
    return dense_encoder(weights), str(checkpoint), {"kind": weights.kind, "steps": weights.meta.get("steps"),
                                                     "trained_input_size": weights.meta.get("input_size")}


def pick_device(device):
    """"auto" -> cuda if there is a GPU, else cpu; a CUDA device without a GPU is refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError(f"`device` {device}: no CUDA GPU is visible here: use `device` cpu")
    return device


def load_trunk(encoder, state, name="the weights"):
    """Copy stem, downsampling and stages into `encoder` exactly (the final norm is not used)."""
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("norm.", "head."))]
    if missing or unexpected:
        raise UserError(f"{name} does not fit the encoder: {(missing or unexpected)[0]} "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")


def pooled(encoder, imgs):
    """imgs (N, C, H, W) -> global-average-pooled last-stage features (N, C_last), fp32."""
    return encoder.forward_features(imgs).mean((-2, -1)).float()


@torch.inference_mode()
def embed(encoder, loader, device="cpu", precision="32"):
    """(L2-normalized pooled features (N, C_last), labels (N,)) of a loader of
    (image, label, ...) batches."""
    feats, labels = [], []
    for batch in loader:
        with autocast(device, precision):
            feats.append(pooled(encoder, batch[0].to(device, non_blocking=True)))
        labels.append(batch[1].to(device))
    return F.normalize(torch.cat(feats), dim=-1), torch.cat(labels)


# ----------------------------------------------------------------------------- kNN

@torch.no_grad()
def knn_scores(train_feats, train_labels, feats, num_classes, k=20, temperature=0.07, chunk=1024):
    """Class votes (M, num_classes) for `feats` (M, D) from the k nearest train features
    (N, D) by cosine similarity (all features L2-normalized), each weighted exp(sim / T)."""
    k = min(k, train_feats.shape[0])
    out = []
    for q in feats.split(chunk):  # (B, D): bounds the (B, N) similarity matrix
        sim, idx = (q @ train_feats.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


def knn_accuracy(train_feats, train_labels, feats, labels, num_classes, k=20, temperature=0.07):
    """{"top1": %, "top5": %} of the weighted kNN classifier (top-5 is top-min(5, classes))."""
    scores = knn_scores(train_feats, train_labels, feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices  # (M, 5)
    hits = top == labels[:, None]
    return {"top1": 100.0 * hits[:, 0].double().mean().item(), "top5": 100.0 * hits.any(1).double().mean().item()}


def knn_evaluate(encoder, train, val, num_classes, k=20, temperature=0.07, device="cpu", precision="32",
                 batch_size=64, workers=0):
    """Embed both labelled sets and classify val by weighted kNN: {"top1", "top5", "seconds", "train", "val"}."""
    start = time.perf_counter()
    train_feats, train_labels = embed(encoder, loader(train, batch_size, workers, train=False), device, precision)
    feats, labels = embed(encoder, loader(val, batch_size, workers, train=False), device, precision)
    result = knn_accuracy(train_feats, train_labels, feats, labels, num_classes, k, temperature)
    return {**result, "seconds": time.perf_counter() - start, "train": len(train), "val": len(val)}
