"""The exit codes of `wurstfabrik`, for schedulers: what a rerun can finish (1) and what needs a fix first (2)."""

import textwrap

EXIT_DONE = 0
EXIT_INCOMPLETE = 1  # a rerun, as it is, can finish the job
EXIT_REFUSED = 2  # a rerun meets the same problem until someone fixes it
EXIT_LEASED = 3

# The help's table (the docs' exit-code table says the same at length).
MEANINGS = (
    ("0", "every image recorded ok (bad input rows aside); a failed manifest merge or record write is a warning"),
    ("1", "run again: images failed or missing, the run stopped (stall, lost lease) or storage was unreachable "
          "or throttling"),
    ("2", "fix first, a rerun alone cannot: the spec, inputs, checkpoints, placement, or storage (credentials, "
          "access denied, missing bucket, damaged or mismatching object)"),
    ("3", "another live run holds the output's lease"),
    ("130, 143", "stopped by SIGINT or SIGTERM (128 + the signal's number); run again"),
)


def help_table(width: int = 79) -> str:
    """MEANINGS as the `--help` text shows them, one wrapped entry per code."""
    return "exit codes:\n" + "\n".join(textwrap.fill(meaning, width, initial_indent=f"  {code:<10}",
                                                       subsequent_indent=" " * 12) for code, meaning in MEANINGS)


def storage_exit(transient: bool) -> int:
    """A storage failure's code: an outage that outlasted the retries passes, anything else does not by itself."""
    return EXIT_INCOMPLETE if transient else EXIT_REFUSED
