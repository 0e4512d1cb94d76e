"""The one exception the conversion tools raise for bad input."""


class ConversionError(RuntimeError):
    """An input the converter cannot use (unknown architecture, missing or truncated file,
    inconsistent shapes, a parallel layout that does not divide the model, an output directory
    that must not be replaced). The message names the problem and the fix; nothing that looks
    like a valid output is left behind."""
