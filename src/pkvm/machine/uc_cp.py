"""unicorn's `uc_arm64_cp_reg`: a system register named by encoding, with its value.

The one ctypes structure of the register file (`pkvm.machine.context`), kept in this small
module that stays pure Python: mypyc emits C that does not compile for a `ctypes.Structure`
subclass, and with the structure here the register file itself is compiled (setup.py).
"""

import ctypes


class CpReg(ctypes.Structure):
    """`uc_arm64_cp_reg` of unicorn 2.1's `arm64.h`: CRn, CRm, op0, op1, op2, then the value."""

    _fields_ = [
        ("crn", ctypes.c_uint32),
        ("crm", ctypes.c_uint32),
        ("op0", ctypes.c_uint32),
        ("op1", ctypes.c_uint32),
        ("op2", ctypes.c_uint32),
        ("val", ctypes.c_uint64),
    ]
