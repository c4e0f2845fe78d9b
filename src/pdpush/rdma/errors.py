"""Typed errors of the RDMA counter reader.

Every error carries a message that is one complete line for a user, so the CLI prints
`str(error)` and exits non-zero without a traceback, and library callers (the decode step
probe) can catch one base class."""

import errno
import os


class RdmaError(Exception):
    """Base class: anything the reader cannot recover from on its own."""


class NetlinkUnavailable(RdmaError):
    """The kernel has no NETLINK_RDMA (CONFIG_INFINIBAND unset): socket() gave EPROTONOSUPPORT."""


class PermissionDenied(RdmaError):
    """The kernel or sysfs refused us (EPERM/EACCES)."""


class DeviceGone(RdmaError):
    """A (device, port) seen earlier no longer exists; re-enumerate to continue."""


class MalformedMessage(RdmaError):
    """A reply that does not follow the netlink format (truncated, bad lengths, bad values)."""


class KernelError(RdmaError):
    """The kernel answered a request with NLMSG_ERROR (or an error in NLMSG_DONE)."""

    def __init__(self, code: int, what: str):
        self.errno = code
        self.what = what
        name = errno.errorcode.get(code, f"errno {code}")
        super().__init__(f"kernel answered {what} with {name}: {os.strerror(code)}")
