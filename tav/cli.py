"""The error policy every tool shares: a user error (a bad input the user can fix) prints one `error: ...` line to
stderr and exits 1; anything else is a bug and keeps its traceback, as does every error under `--debug`.

A user error is an instance of one of tav's input-error classes, listed once in USER_ERRORS by module and name,
or a FileNotFoundError (an input path the user named that is not there). The classes are looked up only in modules
that are already imported: an error class whose module was never imported cannot have been raised, so this module
imports nothing from tav (the pipeline tool never pulls in training to decide how to print an error).

    def main(argv=None):
        args = parse_args(argv)
        ...

    if __name__ == "__main__":
        sys.exit(run_cli(main))          # main's args: anything with a `debug` attribute, or `--debug` in argv
"""
import argparse
import sys

# (module, class name) of every error tav raises for a bad input rather than a bug.
USER_ERRORS = (
    ("tav.config", "ConfigError"),
    ("tav.pipeline", "PipelineError"),
    ("tav.video", "VideoError"),
    ("tav.checkpoint", "CheckpointError"),
    ("tav.training", "TrainingError"),
    ("tav.backend", "DeviceConfigError"),
    ("tav.backend", "DeviceUnavailableError"),
    ("tav.memory_plan", "PlanError"),
    ("tav.world", "WorldError"),
)
# Standard exceptions that mean a bad input too: a path the user named that does not exist.
BUILTIN_USER_ERRORS = (FileNotFoundError,)


def user_error_classes():
    """The user-error classes that can have been raised so far (those of modules already imported)."""
    classes = list(BUILTIN_USER_ERRORS)
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None:
            classes.append(cls)
    return tuple(classes)


def is_user_error(exc):
    return isinstance(exc, user_error_classes())


def error_line(exc):
    """The line a user error prints: `error: <message>` (the message alone, never the class name)."""
    return f"error: {str(exc).strip() or type(exc).__name__}"


def parse_bool(text):
    """mindone's scripts' spelling of a boolean flag (--use_parallel True), as an argparse type."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def run_cli(main, argv=None):
    """Run a tool's `main(argv)` under the shared error policy; returns the exit status for sys.exit.

    `--debug` in argv (sys.argv[1:] when argv is None) re-raises user errors with their traceback."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        status = main(arguments)
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and bugs below
        if "--debug" in arguments or not is_user_error(exc):
            raise
        print(error_line(exc), file=sys.stderr)
        return 1
    return 0 if status is None else status
