"""Every error mirrord reports, and the exit code each one means.

The tree (exit code in brackets)::

    MirrordError [1]                any other failure; the message says what to do
    ├── BadInput [2]                the request is wrong; nothing was changed
    ├── Refused [3]                 not allowed in the current state; nothing was changed
    │   ├── DaemonNotRunning [3]    no daemon answers on the control socket
    │   └── SplitBrain [3]          both copies changed independently; refuse to sync
    ├── NotAvailable [1]            the mechanism behind a command does not exist yet
    ├── LabError [1]                the namespace lab could not do what was asked
    ├── PeerError [1]               the peer broke the protocol or could not be reached
    │   └── HandshakeRefused [1]    the peer is incompatible (version, disk size, secret)
    └── NativeError [1]             the C data path returned an error code
        ├── FrameError [1]          a frame failed its length or CRC32C check
        ├── FuseError [1]           libfuse could not mount or serve the disk
        └── ActivityLogError [1]    the activity log file is unreadable or of another geometry

Third-party and OS errors are translated into this tree at the boundary that
calls them (``raise ... from``), so the CLI can map any failure to one exit
code and one sentence.
"""

from __future__ import annotations


class MirrordError(Exception):
    """Base of every mirrord error; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class BadInput(MirrordError):
    exit_code = 2


class Refused(MirrordError):
    exit_code = 3


class DaemonNotRunning(Refused):
    pass


class SplitBrain(Refused):
    pass


class NotAvailable(MirrordError):
    pass


class LabError(MirrordError):
    pass


class PeerError(MirrordError):
    pass


class HandshakeRefused(PeerError):
    pass


class NativeError(MirrordError):
    pass


class FrameError(NativeError):
    pass


class FuseError(NativeError):
    pass


class ActivityLogError(NativeError):
    pass
