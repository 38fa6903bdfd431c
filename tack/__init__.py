"""tack: a Tangled spindle that stitches any CI into Tangled."""

__version__ = "0.1.0"
