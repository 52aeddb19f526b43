"""A loopback OpenAI-compatible (and Anthropic-compatible) server for offline tests.

```python
from moa.testing import LoopbackServer, ModelBehavior

with LoopbackServer({"fast": ModelBehavior(reply="The answer is 4.")}) as srv:
    registry = srv.registry(prefix="loop")     # model refs "loop/fast", ...
```
"""

from .behavior import ModelBehavior
from .gate import Gate
from .server import LoopbackServer, RecordedRequest

__all__ = ["Gate", "LoopbackServer", "ModelBehavior", "RecordedRequest"]
