"""Errors a user can cause. The CLI prints them without a traceback and exits with `exit_code`."""


class UserError(Exception):
    """A mistake in the user's spec, flags or inputs: exit status 2."""

    exit_code = 2

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []


class FrozenPlanError(UserError):
    """`run --frozen` found steps that differ from tunepipe.lock: exit status 3."""

    exit_code = 3


class StepFailed(Exception):
    """A step's process failed; carries the step id, exit status and the tail of its log."""

    exit_code = 1

    def __init__(self, step_id: str, returncode: int, log_tail: str):
        super().__init__(f"step {step_id} failed with exit status {returncode}")
        self.step_id = step_id
        self.returncode = returncode
        self.log_tail = log_tail
