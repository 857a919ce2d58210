"""Built-in stages; importing this package registers them."""
from . import rtn  # noqa: F401
