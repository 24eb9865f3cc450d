"""Where a node keeps its state: everything lives under ``MIRRORD_HOME``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("/var/lib/mirrord")


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> "Home":
        return cls(Path(os.environ.get("MIRRORD_HOME", str(DEFAULT_HOME))))

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def dev_dir(self) -> Path:
        return self.root / "dev"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def settings_file(self) -> Path:
        return self.root / "ha.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def meta_file(self, volume: str) -> Path:
        return self.root / f"{volume}.meta"

    def activity_log(self, volume: str) -> Path:
        """The primary's hot extents (ext/activity_log.h), beside the metadata, never on the disk."""
        return self.root / f"{volume}.al"

    def device(self, volume: str) -> Path:
        return self.dev_dir / volume

    def ensure(self) -> None:
        """Create the directories; run/ is root-only because it holds the control socket."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.dev_dir.mkdir(exist_ok=True)
        self.run_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
