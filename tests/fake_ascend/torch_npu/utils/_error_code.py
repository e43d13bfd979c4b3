"""Fake torch_npu.utils._error_code: the suffix torch_npu appends to its error messages
(torch_npu/utils/_error_code.py: '\\n[ERROR] <time> (PID:.., Device:.., RankID:..) ERR<sub><code> <SUB> <text>')."""
import enum
import os
import time


class _SubModule(enum.Enum):
    PTA = 0
    OPS = 1
    DIST = 2


class ErrCode(enum.Enum):
    SUCCESS = (0, 'success')
    PARAM = (1, 'invalid parameter')
    TYPE = (2, 'invalid type')
    VALUE = (3, 'invalid value')
    PTR = (4, 'invalid pointer')
    INTERNAL = (5, 'internal error')
    MEMORY = (6, 'memory error')
    NOT_SUPPORT = (7, 'feature not supported')
    NOT_FOUND = (8, 'resource not found')
    UNAVAIL = (9, 'resource unavailable')
    SYSCALL = (10, 'system call failed')
    TIMEOUT = (11, 'timeout error')
    PERMISSION = (12, 'permission error')
    ACL = (100, 'call acl api failed')
    HCCL = (200, 'call hccl api failed')

    @property
    def code(self):
        return self.value[0]

    @property
    def msg(self):
        return self.value[1]


def _suffix(sub, error):
    from torch_npu._core import STATE
    stamp = time.strftime('%Y-%m-%d-%H:%M:%S', time.localtime())
    return (f'\n[ERROR] {stamp} (PID:{os.getpid()}, Device:{STATE.current}, RankID:-1) '
            f'ERR{sub.value:02d}{error.code:03d} {sub.name} {error.msg}')


def pta_error(error):
    return _suffix(_SubModule.PTA, error)


def ops_error(error):
    return _suffix(_SubModule.OPS, error)


def dist_error(error):
    return _suffix(_SubModule.DIST, error)
