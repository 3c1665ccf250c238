"""The harness's container runtime: a pod's process runs as the pod's user, on a read-only root
filesystem, able to write only to its mounted volumes.

A real kubelet starts the container from its image with ``runAsUser``/``runAsGroup``/``fsGroup``,
``readOnlyRootFilesystem`` and the pod's volumes mounted. The harness has no images and no container
runtime, so it builds the nearest thing from what Linux offers a root process, in a child process
before it ``exec``s the container's command:

1. a private mount namespace (``unshare(CLONE_NEWNS)``), so nothing below leaks to the host;
2. a new root: a small tmpfs holding read-only bind mounts of what an image would carry here (``/usr``,
   ``/bin``, ``/lib*``, the Python interpreter and virtualenv, this checkout), ``/etc`` as a
   read-only overlay (with the cluster's Service names added to ``/etc/hosts``), ``/proc``,
   ``/sys`` (read-only) and ``/dev``; every other top-level directory (``/tmp``, ``/var``, ``/root``,
   ``/home``) simply does not exist unless a volume is mounted there;
3. the pod's volumes bind-mounted at their ``mountPath`` (read-only when the mount says so); then the
   tmpfs root itself is remounted read-only (``readOnlyRootFilesystem: true``; with ``false`` it stays
   writable, as an image's writable layer would be);
4. ``chroot``, supplementary groups (``fsGroup``, ``supplementalGroups``), ``setgid(runAsGroup)``,
   ``setuid(runAsUser)`` (a non-zero UID loses every capability, as ``drop: [ALL]`` asks), and
   ``no_new_privs`` when ``allowPrivilegeEscalation`` is false; then ``exec``.

So a stage that writes outside its mounts gets ``EROFS`` (or ``EACCES``) exactly where a pod would,
and a file only root may read stays unreadable. Limits, said plainly: the image's own content and its
USER are not modelled (every "image" is this machine's /usr plus this checkout, so a third-party
image's layout, such as TGI's interpreter under /root, is checked against its upstream source
instead, see docs/kubernetes.md); there is no PID, network, IPC or cgroup isolation (pods share the
host network, so loopback servers stand in for cluster Services, and resource limits are not
enforced: the scheduler model accounts requests only); ``fsGroup`` ownership of a PersistentVolume is
modelled with a default ACL granting the group (the harness's controller runs as root in the test
process, where the real one runs as the pods' UID). It needs root (``CAP_SYS_ADMIN``); the harness
refuses to start without it unless ``BEZOAR_HARNESS_SANDBOX=off`` is set, which runs pods unconfined.

Run as ``python k8s_sandbox.py SPEC.json``; the spec is written by :func:`write_spec`.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def available() -> str | None:
    """None when pods can be sandboxed here, else why not."""
    if os.environ.get("BEZOAR_HARNESS_SANDBOX", "").lower() in ("0", "off", "no"):
        return "BEZOAR_HARNESS_SANDBOX=off"
    if os.geteuid() != 0:
        return "the tests do not run as root (the sandbox needs CAP_SYS_ADMIN to build a mount namespace)"
    if sys.platform != "linux":
        return "not Linux"
    return None


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None,
                   ctypes.c_ulong(flags), data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} -> {dst} ({fstype}, {flags:#x}): {os.strerror(e)}")


def _bind(src: str, dst: str, readonly: bool, recursive: bool = True) -> None:
    _mount(src, dst, None, MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)


def _mkpoint(root: Path, path: str, is_file: bool) -> Path:
    p = root / path.lstrip("/")
    if is_file:
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            p.touch()
    else:
        p.mkdir(parents=True, exist_ok=True)
    return p


def host_binds() -> list[str]:
    """What every "image" carries, read-only: the system directories, the interpreter, the
    virtualenv and the checkout. Nested paths are dropped (their ancestor is already there)."""
    repo = Path(__file__).resolve().parents[1]
    want = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", str(repo), sys.prefix, sys.base_prefix,
            os.path.realpath(sys.base_prefix), os.path.dirname(os.path.realpath(sys.executable))]
    want += [p for p in sys.path if p and os.path.isabs(p) and os.path.exists(p)]
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in want if os.path.lexists(p)}, key=len):
        if p in ("/", "/tmp") or any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            continue
        out.append(p)
    return out


# -- POSIX ACLs (system.posix_acl_*): a group's rwx on a PVC, inherited by everything created in it --
_ACL_USER_OBJ, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 0x01, 0x04, 0x08, 0x10, 0x20


def _acl(entries: list[tuple[int, int, int]]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in entries)


def grant_group(path: Path, gid: int) -> None:
    """The kubelet's ``fsGroup`` on a volume (``fsGroupChangePolicy: Always``): at every mount, each file
    and directory below ``path`` becomes group-``gid`` read/write (directories setgid). A default ACL on
    every directory also grants the group what is created there later by another user (the harness's
    controller, root in the test process, where the real one runs as the pods' UID)."""
    entries = [(_ACL_USER_OBJ, 7, 0xFFFFFFFF), (_ACL_GROUP_OBJ, 7, 0xFFFFFFFF), (_ACL_GROUP, 7, gid),
               (_ACL_MASK, 7, 0xFFFFFFFF), (_ACL_OTHER, 5, 0xFFFFFFFF)]
    for dirpath, _dirs, files in os.walk(path):
        os.chown(dirpath, -1, gid)
        os.chmod(dirpath, os.stat(dirpath).st_mode & 0o7777 | 0o2070)
        os.setxattr(dirpath, "system.posix_acl_access", _acl(entries))
        os.setxattr(dirpath, "system.posix_acl_default", _acl(entries))
        for f in files:
            fp = os.path.join(dirpath, f)
            if not os.path.islink(fp):
                os.chown(fp, -1, gid)
                os.chmod(fp, os.stat(fp).st_mode & 0o7777 | 0o060)


# -- the spec the harness writes, and the child that applies it ------------------------------------
def write_spec(path: Path, *, argv: list[str], env: dict[str, str], cwd: str, rootfs: Path,
               mounts: list[dict[str, Any]], uid: int, gid: int, groups: list[int], read_only_root: bool,
               no_new_privs: bool, hosts: str) -> None:
    """``mounts``: ``{"source": host path, "target": path in the pod, "readOnly": bool, "file": bool}``."""
    path.write_text(json.dumps({"argv": argv, "env": env, "cwd": cwd, "rootfs": str(rootfs), "mounts": mounts,
                                "uid": uid, "gid": gid, "groups": groups, "readOnlyRoot": read_only_root,
                                "noNewPrivs": no_new_privs, "hosts": hosts, "binds": host_binds()}))


def enter(spec: dict[str, Any]) -> None:
    """Build the pod's filesystem view and become its user (in this process, before exec)."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = Path(spec["rootfs"])
    root.mkdir(parents=True, exist_ok=True)
    _mount("tmpfs", str(root), "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64m")
    # /etc: read-only overlay, so mount points can be made in it and /etc/hosts can name Services
    upper = root / ".etc-upper"
    work = root / ".etc-work"
    upper.mkdir()
    work.mkdir()
    etc = _mkpoint(root, "/etc", is_file=False)
    _mount("overlay", str(etc), "overlay", 0, f"lowerdir=/etc,upperdir={upper},workdir={work}")
    hosts = etc / "hosts"
    if hosts.is_symlink() or hosts.exists():
        hosts.unlink()
    hosts.write_text(spec["hosts"])
    for p, ro in (("/proc", False), ("/sys", True), ("/dev", False)):
        _bind(p, str(_mkpoint(root, p, is_file=False)), readonly=ro)
    # the image's content and the pod's volumes, shallowest target first: a checkout that lives under
    # /tmp (a CI clone) stays visible inside a pod that mounts an emptyDir at /tmp
    image = [{"source": p, "target": p, "readOnly": True, "image": True} for p in spec["binds"]]
    for m in sorted([*image, *spec["mounts"]], key=lambda m: len(Path(m["target"]).parts)):
        p = m["target"]
        if m.get("image") and os.path.islink(p) and os.path.dirname(p) == "/":  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(p), root / p.lstrip("/"))
            continue
        target = _mkpoint(root, p, is_file=m.get("file", False))
        _bind(m["source"], str(target), readonly=m.get("readOnly", False), recursive=bool(m.get("image")))
    _mkpoint(root, "/tmp", is_file=False)  # exists in every image; writable only if a volume is mounted
    _mount(None, str(etc), None, MS_REMOUNT | MS_RDONLY)
    if spec["readOnlyRoot"]:
        _mount(None, str(root), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(str(root))
    os.chdir(spec["cwd"] if os.path.isdir(spec["cwd"]) else "/")
    os.setgroups(sorted(set(spec["groups"])))
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    if spec["noNewPrivs"] and _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    try:
        enter(spec)
    except OSError as e:
        print(f"harness sandbox: {e}", file=sys.stderr, flush=True)
        return 128  # what a runtime reports when it cannot create the container
    try:
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        # the runtime's StartError: the command cannot be executed (missing, or not allowed)
        print(f"harness sandbox: exec {spec['argv'][0]}: {os.strerror(e.errno or errno.ENOENT)}", file=sys.stderr,
              flush=True)
        return 128
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
