"""Layer-wise lr decay for ConvNeXt V2, exactly as the public release assigns it.

Each parameter gets a layer id; its lr is scaled by decay ** (num_layers + 1 - id), so the head
(id num_layers + 1) trains at the full lr and the stem the slowest. The release's two rules
(its optim_factory.py, `get_num_layer_for_convnext_single` / `get_num_layer_for_convnext`):

- "single": num_layers = sum(depths). Block b of stage s gets sum(depths[:s]) + b + 1;
  downsample layer i (i = 0 is the stem) shares the id of the first block it feeds,
  sum(depths[:i]) + 1; everything else (final norm, head) gets num_layers + 1.
- "group" (base and larger, depths 3-3-27-3): num_layers = 12. Stem 0, stage 0 -> 1,
  stage 1 and its downsample -> 2, the third stage's 27 blocks three at a time -> 3..11 (its
  downsample joins the first group, 3), the last stage and its downsample -> 12, the rest 13.

`lr_scale` is what fcmae.optim.param_groups takes as the per-parameter multiplier.
"""
from fcmae.errors import SettingError

TYPES = ("single", "group")
GROUP_DEPTHS = (3, 3, 27, 3)  # the only layout the release's "group" rule is written for


def num_layers(depths, decay_type):
    return 12 if decay_type == "group" else sum(depths)


def layer_id(name, depths, decay_type="single"):
    """The release's layer id of parameter `name` (our dense ConvNeXtV2 keys)."""
    parts = name.split(".")
    if decay_type == "single":
        if parts[0] == "downsample_layers":
            return sum(depths[:int(parts[1])]) + 1
        if parts[0] == "stages":
            stage, block = int(parts[1]), int(parts[2])
            return sum(depths[:stage]) + block + 1
        return sum(depths) + 1
    if parts[0] == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]
    return 13


def lr_scale(name, depths, decay, decay_type="single"):
    """The release's lr multiplier of parameter `name`."""
    return decay ** (num_layers(depths, decay_type) + 1 - layer_id(name, depths, decay_type))


def check(depths, decay_type):
    if decay_type not in TYPES:
        raise SettingError(f"`layer_decay_type` must be one of {', '.join(TYPES)}, got '{decay_type}'")
    if decay_type == "group" and tuple(depths) != GROUP_DEPTHS:
        raise SettingError(f"`layer_decay_type` group is the release's grouping for depths {GROUP_DEPTHS} "
                           f"(base, large, huge); this model has depths {tuple(depths)}: use single")

