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

timm's `param_groups_layer_decay` builds the groups (and the no-weight-decay split) from a
model's `group_matcher`; our dense model has none, so `_WithLayerIds` hands it the rule above.
timm renumbers ids to be consecutive and scales by decay ** (max_id - id): the same scales as
the release whenever the used ids are contiguous, which both rules guarantee ("single" never
uses id 0, so every id shifts by one and the exponents are unchanged).
"""
from timm.optim import param_groups_layer_decay

from fcmae.errors import UserError

TYPES = ("single", "group")
GROUP_DEPTHS = (3, 3, 27, 3)  # the only layout the release's "group" rule is written for

# Never weight-decayed besides 1-D tensors (biases, norm weights): GRN's gamma/beta are
# (1, 1, 1, C) in the public layout, so timm's 1-D rule alone would miss them.
NO_WEIGHT_DECAY = ("*grn.gamma", "*grn.beta")


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
    """The release's lr multiplier of parameter `name` (what the tests check timm against)."""
    return decay ** (num_layers(depths, decay_type) + 1 - layer_id(name, depths, decay_type))


def check(depths, decay_type):
    if decay_type not in TYPES:
        raise UserError(f"--layer-decay-type must be one of {', '.join(TYPES)}, got '{decay_type}'")
    if decay_type == "group" and tuple(depths) != GROUP_DEPTHS:
        raise UserError(f"--layer-decay-type group is the release's grouping for depths {GROUP_DEPTHS} "
                        f"(base, large, huge); this model has depths {tuple(depths)}: use single")


class _WithLayerIds:
    """Just enough of a timm model for `param_groups_layer_decay`: parameters + a matcher."""

    def __init__(self, model, decay_type):
        self.model, self.decay_type = model, decay_type

    def named_parameters(self):
        return self.model.named_parameters()

    def group_matcher(self, coarse=False):
        return lambda name: layer_id(name, self.model.depths, self.decay_type)


def param_groups(model, weight_decay, layer_decay, decay_type="single"):
    """AdamW parameter groups with `lr_scale` (applied by timm's schedulers) and weight decay
    off for biases, norm weights and GRN gamma/beta."""
    check(model.depths, decay_type)
    return param_groups_layer_decay(_WithLayerIds(model, decay_type), weight_decay=weight_decay,
                                    no_weight_decay_list=NO_WEIGHT_DECAY, layer_decay=layer_decay)
