"""What fcmae raises for a user's mistake (one line, exit 2), a stopped run and a non-finite loss."""
import re

SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


class UserError(Exception):
    """A mistake in the user's input or files: `fcmae` prints it as one line and exits with 2."""


class SettingError(UserError, ValueError):
    """A library's refusal of a value it was given, stated as a fact about its settings: the
    message names each setting in backticks (`in_chans`), never a command-line flag. A command
    words it: `str()` spells a setting as the flag of the same name (`in_chans` -> --in-chans);
    `worded(flags)` spells those a command names otherwise ({"data": "--eval-data"})."""

    def __init__(self, message, flags=None):
        super().__init__(message)
        self.message, self.flags = message, dict(flags or {})

    def worded(self, flags):
        """The same refusal, its settings spelled as `flags` (setting -> flag) where named there."""
        return SettingError(self.message, {**self.flags, **flags})

    def __str__(self):
        return SETTING.sub(lambda m: self.flags.get(m[1], "--" + m[1].replace("_", "-")), self.message)


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


class Stopped(Exception):
    """Training stopped on a scheduler's signal after optimizer step `step`, with the run saved
    to `path` (fcmae/preemption.py). The CLI prints the message (on rank 0) and exits with
    `exit_code`, 128 + the signal number: what a shell reports for a process the signal killed."""

    def __init__(self, signum, step, path, rank=0):
        super().__init__(signum, step, path, rank)
        self.signal, self.step, self.path, self.rank = signum, step, path, rank

    @property
    def exit_code(self):
        return 128 + int(self.signal)

    def __str__(self):
        return (f"stopped by {self.signal.name} at step {self.step}; checkpoint saved to {self.path}; "
                f"rerun the same command to continue")
