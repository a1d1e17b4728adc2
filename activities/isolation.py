"""Isolation of local-backend instances: an unprivileged uid and a network namespace per instance.

When the worker runs as root and iproute2, nsenter and setpriv are present, every instance gets a
*slot*: a uid from a reserved range, a network namespace holding one end of a veth pair, a /30 of a
private range (the host end is `.1`, the instance `.2`) and a private directory for HOME and TMPDIR.
The instance sees only its own address and loopback, so it cannot reach Temporal, the API or other
instances (they listen on the host's loopback); a firewall rule also drops new connections from the
range to the host, for services an operator binds to every address. The veth name doubles as the
slot's lock: the kernel refuses a second link of the same name, so stacks sharing a machine never
claim the same slot (nor, hence, the same uid).

Without root none of this is possible; the supervisor then runs instances as its own user (see
docs/operations.md, Security).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import shutil
import site
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SLOT_ATTEMPTS = 200
SLOTS_DIR = "slots"
"""Under the state directory: one note per slot the stack holds, and the network its firewall rule covers."""
FIREWALL_NOTE = "firewall"
HOST_PREFIX = "gfh"
"""Host-side veth names are `gfh<slot>`; the instance side starts as `gfi<slot>` and becomes `eth0`."""


@dataclass(frozen=True)
class Slot:
    """One instance's identity and network: uid, namespace, veth pair and addresses."""

    index: int
    uid: int
    netns: str
    hostVeth: str
    hostAddress: str
    instanceAddress: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _must(result: subprocess.CompletedProcess[str]) -> None:
    if result.returncode != 0:
        raise OSError(f"{' '.join(map(str, result.args))}: {result.stderr.strip()}")


class SlotAllocator:
    """Claims and releases slots in `network` (split into /30s), with uids from `uid_base`."""

    def __init__(self, network: str, uid_base: int, claims: Path | None = None) -> None:
        self._network = ipaddress.IPv4Network(network)
        if self._network.prefixlen > 28:
            raise ValueError(f"local instance network {network} is too small (at most /28)")
        self._slots = self._network.num_addresses // 4
        self._uid_base = uid_base
        self._claims = claims
        self._firewall_warned = False

    def slot(self, index: int) -> Slot:
        """Return slot `index` (without claiming it)."""
        base = self._network.network_address + 4 * index
        return Slot(
            index=index,
            uid=self._uid_base + index,
            netns=f"gpufn-{index}",
            hostVeth=f"{HOST_PREFIX}{index}",
            hostAddress=str(base + 1),
            instanceAddress=str(base + 2),
        )

    def claim(self, preferred: int | None = None) -> Slot:
        """Claim a free slot (slot `preferred` when it is free) and set up its namespace and veth pair."""
        self._ensure_firewall()
        for attempt in range(SLOT_ATTEMPTS):
            index = preferred if attempt == 0 and preferred is not None else random.randrange(self._slots)
            slot = self.slot(index % self._slots)
            peer = f"gfi{slot.index}"
            if _ip("link", "add", slot.hostVeth, "type", "veth", "peer", "name", peer).returncode != 0:
                continue  # taken by another instance, of this stack or another one
            try:
                # A namespace left by a crashed stack under this name is stale: this slot is ours now.
                _ip("netns", "del", slot.netns)
                _must(_ip("netns", "add", slot.netns))
                _must(_ip("link", "set", peer, "netns", slot.netns))
                _must(_ip("-n", slot.netns, "link", "set", peer, "name", "eth0"))
                _must(_ip("addr", "add", f"{slot.hostAddress}/30", "dev", slot.hostVeth))
                _must(_ip("link", "set", slot.hostVeth, "up"))
                _must(_ip("-n", slot.netns, "addr", "add", f"{slot.instanceAddress}/30", "dev", "eth0"))
                _must(_ip("-n", slot.netns, "link", "set", "eth0", "up"))
                _must(_ip("-n", slot.netns, "link", "set", "lo", "up"))
            except OSError:
                self.release(slot)
                raise
            return slot
        raise OSError(f"no free instance slot in {self._network} after {SLOT_ATTEMPTS} tries")

    def release(self, slot: Slot) -> None:
        """Delete the slot's namespace and veth pair (the instance must have stopped)."""
        release_slot(slot)

    def _ensure_firewall(self) -> None:
        """Drop new connections from instances to this host (replies to the host's own connections pass).

        Checked at every claim, not once: another stack on the machine may have removed the rules when it
        stopped with no instance left (`remove_firewall_if_unused`).
        """
        if shutil.which("iptables") is None:
            if not self._firewall_warned:
                log.warning("iptables not found: instances can reach host services bound to every address")
            self._firewall_warned = True
            return
        source = str(self._network)
        if self._claims is not None:
            # The stack's stop removes the rules again (`remove_firewall_if_unused`).
            self._claims.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self._claims / FIREWALL_NOTE).write_text(source)
        for rule in _firewall_rules(
            source
        ):  # inserted at the top in this order, so ACCEPT ends up before DROP
            present = subprocess.run(["iptables", "-C", "INPUT", *rule], capture_output=True, check=False)
            if present.returncode == 0:
                continue
            added = subprocess.run(
                ["iptables", "-I", "INPUT", "1", *rule], capture_output=True, text=True, check=False
            )
            if added.returncode != 0:
                log.warning("Could not add firewall rule %s: %s", rule, added.stderr.strip())


def _firewall_rules(source: str) -> list[list[str]]:
    """The INPUT rules for instance network `source`, in the order they are inserted at the top."""
    return [
        ["-s", source, "-j", "DROP"],
        ["-s", source, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
    ]


def remove_firewall_if_unused(claims: Path) -> bool:
    """Delete the firewall rules this stack added, unless an instance (of any stack) still needs them.

    Stacks on one machine share the rules of a shared instance network, so they go only when no host
    end of an instance's veth pair is left. Returns whether they were removed.
    """
    note = claims / FIREWALL_NOTE
    try:
        source = note.read_text().strip()
    except OSError:
        return False
    links = _ip("-o", "link", "show").stdout
    if any(line.split(":")[1].strip().startswith(HOST_PREFIX) for line in links.splitlines() if ":" in line):
        return False
    for rule in _firewall_rules(source):
        # -D removes one copy; set-up added at most one, but a crashed older stack may have added more.
        for _ in range(10):
            if subprocess.run(
                ["iptables", "-D", "INPUT", *rule], capture_output=True, check=False
            ).returncode:
                break
    note.unlink(missing_ok=True)
    return True


def release_slot(slot: Slot) -> None:
    """Delete a slot's namespace and veth pair; the kernel then frees the slot for the next claim."""
    _ip("netns", "del", slot.netns)
    _ip("link", "del", slot.hostVeth)


def launch_prefix(slot: Slot) -> list[str]:
    """Return the command prefix that runs a command in the slot's namespace as the slot's uid."""
    nsenter, setpriv = shutil.which("nsenter"), shutil.which("setpriv")
    assert nsenter is not None and setpriv is not None
    return [
        nsenter,
        f"--net=/run/netns/{slot.netns}",
        setpriv,
        f"--reuid={slot.uid}",
        f"--regid={slot.uid}",
        "--clear-groups",
        # setuid programs (su, sudo) cannot hand the instance back any privilege.
        "--no-new-privs",
        "--",
    ]


def _reachable_by_others(path: Path) -> bool:
    """Return whether a user with no relation to the file's owner can execute `path`."""
    path = path.resolve()
    for directory in path.parents:
        if not directory.stat().st_mode & 0o001:
            return False
    return bool(path.stat().st_mode & 0o001)


def instance_python(root: Path) -> tuple[Path, str | None]:
    """Return a directory holding `python` that an instance's uid can run, and a PYTHONPATH if needed.

    Instances run `python ...` with the worker's packages. When the worker's interpreter lives where
    other users cannot go (pyenv under /root, say), the system's Python of the same version runs
    instead, with the worker's site-packages on PYTHONPATH (an editable install's .pth is not read).
    """
    bin_dir = root / "python-bin"
    interpreter = Path(sys.executable)
    python_path: str | None = None
    if not _reachable_by_others(interpreter):
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        system = Path(shutil.which(version, path="/usr/local/bin:/usr/bin:/bin") or "")
        if not system.name or not _reachable_by_others(system):
            return interpreter.parent, None  # nothing better: the instance fails to start, visibly
        interpreter = system
        python_path = os.pathsep.join(p for p in site.getsitepackages() if Path(p).is_dir())
    bin_dir.mkdir(parents=True, exist_ok=True)
    bin_dir.chmod(0o755)
    for name in ("python", "python3"):
        # Replaced atomically: stacks sharing the machine may do this at the same moment.
        staging = bin_dir / f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        staging.symlink_to(interpreter)
        os.replace(staging, bin_dir / name)
    return bin_dir, python_path


def make_private_dir(root: Path, name: str, uid: int | None) -> Path:
    """Create the instance's private directory (mode 0700, owned by its uid) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    # Others may pass through the root to their own directory, but not list it.
    root.chmod(0o711)
    path = root / name
    path.mkdir(mode=0o700, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def remove_private_dir(path: Path) -> None:
    """Delete an instance's private directory."""
    with contextlib.suppress(OSError):
        shutil.rmtree(path)


def record_claim(claims: Path, slot: Slot) -> None:
    """Note in the stack's state that it holds `slot` (written once the kernel gave it the veth name).

    A worker killed between claiming a slot and recording its instance leaves a namespace no record
    names; the next worker finds it here and deletes it (`reap_unrecorded`).
    """
    claims.mkdir(mode=0o700, parents=True, exist_ok=True)
    (claims / f"{slot.index}.json").write_text(json.dumps(asdict(slot)))


def forget_claim(claims: Path, slot: Slot) -> None:
    """Delete the note of a slot this stack released."""
    with contextlib.suppress(OSError):
        (claims / f"{slot.index}.json").unlink()


def reap_unrecorded(claims: Path, in_use: set[int]) -> list[Slot]:
    """Release every slot this stack claimed that no instance holds; return them."""
    reaped = []
    for path in sorted(claims.glob("*.json")) if claims.is_dir() else []:
        try:
            slot = Slot(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if slot.index in in_use:
            continue
        release_slot(slot)
        path.unlink(missing_ok=True)
        reaped.append(slot)
    if reaped:
        log.info(
            "Released %d instance network(s) no instance held: %s", len(reaped), [s.netns for s in reaped]
        )
    return reaped
