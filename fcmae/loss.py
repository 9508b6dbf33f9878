"""FCMAE loss: per-patch MSE against (optionally per-patch normalized) pixels, averaged over the
masked patches only."""


def normalize_patches(target, eps=1e-6):
    """Per-patch zero mean, unit variance: (N, L, D) -> (N, L, D)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_patch_loss(pred, target, mask, norm_pix_loss=True):
    """pred, target (N, L, D) with target the patchified image; mask (N, L), 1 = masked."""
    if norm_pix_loss:
        target = normalize_patches(target)
    per_patch = (pred - target).pow(2).mean(dim=-1)  # (N, L)
    return (per_patch * mask).sum() / mask.sum()
