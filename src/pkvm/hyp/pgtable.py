"""EL2's page-table code: `hyp/pgtable.c`, which Linux links into the host kernel too.

The implementation lives in `pkvm.arch.pgtable` (shared by `pkvm.hyp` and `pkvm.host`); this
module is where a pKVM developer looks for it under `hyp/`.
"""

from pkvm.arch.pgtable import *  # noqa: F403
