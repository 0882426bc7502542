"""FF-A function IDs, error codes, versions and descriptor sizes (`include/linux/arm_ffa.h`):
one definition for EL2's proxy (`pkvm.hyp.ffa`, `pkvm.hyp.ffa_mem`), the secure world at EL3
(`pkvm.machine.spmc`), the checkers (`pkvm.check.ffa_ops`, `pkvm.check.ghost_ffa`) and the
real-kernel SMC comparison (`pkvm.conform.smc`).

Function IDs are SMC32 (`0x84...`) unless named `FFA_FN64_*` (`0xC4...`), as in the header.
"""

from typing import Final

FFA_ERROR: Final = 0x8400_0060
FFA_SUCCESS: Final = 0x8400_0061
FFA_FN64_SUCCESS: Final = 0xC400_0061
FFA_INTERRUPT: Final = 0x8400_0062
FFA_VERSION: Final = 0x8400_0063
FFA_FEATURES: Final = 0x8400_0064
FFA_RX_RELEASE: Final = 0x8400_0065
FFA_RXTX_MAP: Final = 0x8400_0066
FFA_FN64_RXTX_MAP: Final = 0xC400_0066
FFA_RXTX_UNMAP: Final = 0x8400_0067
FFA_PARTITION_INFO_GET: Final = 0x8400_0068
FFA_ID_GET: Final = 0x8400_0069
FFA_MSG_POLL: Final = 0x8400_006A
FFA_MSG_WAIT: Final = 0x8400_006B
FFA_MSG_YIELD: Final = 0x8400_006C
FFA_MSG_RUN: Final = 0x8400_006D
FFA_MSG_SEND: Final = 0x8400_006E
FFA_MSG_SEND_DIRECT_REQ: Final = 0x8400_006F
FFA_FN64_MSG_SEND_DIRECT_REQ: Final = 0xC400_006F
FFA_MSG_SEND_DIRECT_RESP: Final = 0x8400_0070
FFA_FN64_MSG_SEND_DIRECT_RESP: Final = 0xC400_0070
FFA_MEM_DONATE: Final = 0x8400_0071
FFA_FN64_MEM_DONATE: Final = 0xC400_0071
FFA_MEM_LEND: Final = 0x8400_0072
FFA_FN64_MEM_LEND: Final = 0xC400_0072
FFA_MEM_SHARE: Final = 0x8400_0073
FFA_FN64_MEM_SHARE: Final = 0xC400_0073
FFA_MEM_RETRIEVE_REQ: Final = 0x8400_0074
FFA_FN64_MEM_RETRIEVE_REQ: Final = 0xC400_0074
FFA_MEM_RETRIEVE_RESP: Final = 0x8400_0075
FFA_MEM_RELINQUISH: Final = 0x8400_0076
FFA_MEM_RECLAIM: Final = 0x8400_0077
FFA_MEM_OP_PAUSE: Final = 0x8400_0078
FFA_MEM_OP_RESUME: Final = 0x8400_0079
FFA_MEM_FRAG_RX: Final = 0x8400_007A
FFA_MEM_FRAG_TX: Final = 0x8400_007B
FFA_NORMAL_WORLD_RESUME: Final = 0x8400_007C
FFA_NOTIFICATION_BITMAP_CREATE: Final = 0x8400_007D
FFA_NOTIFICATION_BITMAP_DESTROY: Final = 0x8400_007E
FFA_NOTIFICATION_BIND: Final = 0x8400_007F
FFA_NOTIFICATION_UNBIND: Final = 0x8400_0080
FFA_NOTIFICATION_SET: Final = 0x8400_0081
FFA_NOTIFICATION_GET: Final = 0x8400_0082
FFA_NOTIFICATION_INFO_GET: Final = 0x8400_0083
FFA_NOTIFICATION_CALLS: Final = (FFA_NOTIFICATION_BITMAP_CREATE, FFA_NOTIFICATION_BITMAP_DESTROY,
                          FFA_NOTIFICATION_BIND, FFA_NOTIFICATION_UNBIND, FFA_NOTIFICATION_SET,
                          FFA_NOTIFICATION_GET, FFA_NOTIFICATION_INFO_GET)
FFA_CONSOLE_LOG: Final = 0x8400_008A
FFA_PARTITION_INFO_GET_REGS: Final = 0xC400_008B
FFA_MSG_SEND_DIRECT_REQ2: Final = 0xC400_008D
FFA_MSG_SEND_DIRECT_RESP2: Final = 0xC400_008E

# Error codes (FFA_ERROR's w2, as a signed 32-bit value).
FFA_RET_SUCCESS: Final = 0
FFA_RET_NOT_SUPPORTED: Final = -1
FFA_RET_INVALID_PARAMETERS: Final = -2
FFA_RET_NO_MEMORY: Final = -3
FFA_RET_BUSY: Final = -4
FFA_RET_INTERRUPTED: Final = -5
FFA_RET_DENIED: Final = -6
FFA_RET_RETRY: Final = -7
FFA_RET_ABORTED: Final = -8
FFA_RET_NO_DATA: Final = -9

FFA_VERSION_1_0: Final = 0x1_0000
FFA_VERSION_1_1: Final = 0x1_0001
FFA_VERSION_1_2: Final = 0x1_0002
FFA_PAGE_SIZE: Final = 4096
FFA_FEAT_RXTX_MIN_SZ_MASK: Final = 0x3

# Memory-transaction descriptor (`struct ffa_mem_region`): 48 bytes from v1.1 (v1.0: 32, its
# endpoint array right after); the endpoint descriptor (`struct ffa_mem_region_attributes`,
# EMAD) is 16 bytes, 32 from v1.2 (an implementation-defined field); the composite region and
# each constituent are 16 bytes.
FFA_MEM_REGION_SZ_1_0: Final = 32
FFA_MEM_REGION_SZ: Final = 48
FFA_EP_MEM_OFFSET_OFF: Final = 32  # `ep_mem_offset`, the offset of the first EMAD (v1.1+)
FFA_COMPOSITE_SZ: Final = 16  # total_pg_cnt u32, addr_range_cnt u32, reserved u64
FFA_RANGE_SZ: Final = 16  # address u64, pg_cnt u32, reserved u32


def ffa_emad_size(version: int) -> int:
    """`ffa_emad_size_get`: the endpoint memory-access descriptor's size for `version`."""
    return 32 if version >= FFA_VERSION_1_2 else 16
