"""Error types. Each maps to one exit code of the `compress` CLI (see `exit_code`)."""

from __future__ import annotations


class CompressorError(Exception):
    """Base of every error the toolchain raises on purpose."""

    exit_code = 3


class RecipeError(CompressorError):
    """The recipe (or a --set override) is invalid. Names the file, the line and the key."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.file, self.line, self.key = file, line, key
        where = file or "<recipe>"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: " + (f"{key}: " if key else "")
        # one line, whatever a key or value quoted from the recipe holds
        super().__init__((prefix + message).replace("\r", "\\r").replace("\n", "\\n"))


class TargetError(CompressorError):
    """The recipe asks for something the target cannot run (e.g. FP8 on an A100)."""

    exit_code = 2


class InputError(CompressorError):
    """A model, data file or output path given by the user is missing, corrupt or unusable."""

    exit_code = 2


class MissingDependency(CompressorError):
    """An optional dependency is not installed; the message carries the install line."""

    exit_code = 2

    def __init__(self, package: str, purpose: str, install: str | None = None):
        install = install or f"pip install {package}"
        super().__init__(f"{package} is needed for {purpose} but is not installed; run: {install}")


class PassError(CompressorError):
    """A pass failed while running. Carries the pass name and the passes that ran before it."""

    exit_code = 3

    def __init__(self, pass_name: str, before: list[str], message: str, *, exit_code: int | None = None):
        self.pass_name, self.before, self.detail = pass_name, list(before), message
        after = f" (after {', '.join(before)})" if before else ""
        super().__init__(f"pass {pass_name}{after} failed: {message}")
        if exit_code is not None:
            self.exit_code = exit_code


class GateFailed(CompressorError):
    """One or more quality/cost gates failed. Artifacts are kept; the report says which gate and by how much."""

    exit_code = 1


class RulesViolated(CompressorError):
    """An artifact breaks a deployment target's rules (e.g. an ONNX graph TensorRT cannot import as quantized)."""

    exit_code = 1
