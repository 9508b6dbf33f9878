class UserError(Exception):
    """A mistake in the user's input or files: `fcmae` prints it as one line and exits with 2."""


class NonFiniteLoss(UserError):
    """Training met a NaN/inf loss (or gradient norm) at optimizer step `step` and stopped before
    that step's update. The module raises it with what it knows (`what`, `value`, `step`, `lr`);
    the run layer adds `checkpoint`, (path, step) of the last good checkpoint, when there is one."""

    def __init__(self, what, value, step, lr, checkpoint=None):
        super().__init__(what, value, step, lr)
        self.what, self.value, self.step, self.lr, self.checkpoint = what, value, step, lr, checkpoint

    def __str__(self):
        if self.checkpoint is not None:
            where = f"the last good checkpoint is {self.checkpoint[0]} (step {self.checkpoint[1]})"
        else:
            where = "no checkpoint was saved before it"
        return (f"non-finite {self.what} ({self.value:g}) at step {self.step}: training stopped; {where}. "
                f"Rerun the same command with a lower lr to resume from it, e.g. --lr {self.lr / 2:.3g} "
                f"(half of {self.lr:.3g})")
