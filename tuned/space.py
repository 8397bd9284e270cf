"""Search spaces, as the public `tuned.space` names them (`Real`, `Int`, `Categorical`,
`Bool`, `Space`): defined in `tuned.core.space`."""

from tuned.core.space import *  # noqa: F403 (the public names)
from tuned.core.space import __all__  # noqa: F401
