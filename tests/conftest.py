"""Session setup shared by every test.

Triton kernels run under the Triton interpreter on CPU (CI) unless GRADSAFE_TRITON_NATIVE=1
(benchmarks/gpu_check.sh runs them natively on a GPU). The interpreter is chosen when triton
is first imported, and other tests import it early (torch.compile does), so it is set here.
"""

import os

if os.environ.get("GRADSAFE_TRITON_NATIVE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
