#!/usr/bin/env python3
"""Builds evio's container image as an OCI image archive, offline and reproducibly (`make image`).

No base image and no registry: the image holds the three binaries, the shared libraries they load (found
with ldd on this machine), busybox-static for the shell, cat and sleep that deploy/evio.yaml's containers
run, the CA bundle (TLS to etcd) and a minimal /etc/passwd. Every file gets mtime 0, owner 0:0 and a
fixed mode, entries are sorted and gzip carries no timestamp, so the same inputs give the same bytes.

    scripts/image.py --bin-dir target/release --out target/evio-image.tar [--tag 0.1.0]
    scripts/image.py --bin-dir target/release --rootfs DIR      # the same tree, unpacked (deploy/Dockerfile)

`ctr -n k8s.io images import target/evio-image.tar` makes it `docker.io/library/evio:<tag>` (the name
deploy/evio.yaml's `image: evio:<tag>` resolves to).

Python's standard library only (tarfile, gzip, hashlib, json): it is on every Debian machine that runs
evio's scripts, and gives the control over tar headers that reproducibility needs.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

BINARIES = ["evio-cni", "eviod", "evioctl"]
# What the DaemonSet's containers run besides evioctl (deploy/evio.yaml): sh, cat, sleep; a few more for a
# person debugging inside the container.
APPLETS = ["sh", "cat", "sleep", "ls", "echo", "env", "id", "grep", "mkdir", "rm", "test", "["]
BUSYBOX = "/bin/busybox"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}


def shared_libraries(paths):
    """The libraries (and the dynamic loader) the binaries load, as absolute paths on this machine."""
    libs = set()
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True)
        if out.returncode != 0:
            if "not a dynamic executable" in out.stdout + out.stderr:
                continue
            sys.exit(f"image: ldd {p} failed: {out.stderr.strip()}")
        for line in out.stdout.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].split("(")[0].strip()
                if target and target != "not":
                    libs.add(target)
                elif "not found" in line:
                    sys.exit(f"image: {p} needs a library that is missing: {line}")
            elif line.startswith("/"):
                libs.add(line.split("(")[0].strip())
    return sorted(libs)


def stripped(src, tmp):
    """A copy of binary `src` without debug information (the image needs none; `strip` is deterministic)."""
    dst = os.path.join(tmp, os.path.basename(src))
    r = subprocess.run(["strip", "--strip-debug", "-o", dst, src], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"image: strip {src}: {r.stderr.strip()} (apt-get install binutils)")
    return dst


def entries(bin_dir, tmp):
    """The image's tree: (path in image, kind, source or link target, mode), sorted by path."""
    out = {}

    def add_dirs(path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            out.setdefault("/".join(parts[:i]), ("dir", None, 0o755))

    def add(path, kind, src, mode):
        path = path.lstrip("/")
        add_dirs(path)
        out[path] = (kind, src, mode)

    bins = []
    for b in BINARIES:
        src = os.path.join(bin_dir, b)
        if not os.path.isfile(src):
            sys.exit(f"image: {src} is missing (cargo build --release --bins)")
        bins.append(src)
        add(f"usr/local/bin/{b}", "file", stripped(src, tmp), 0o755)
    for lib in shared_libraries(bins):
        # The real file under the path the loader asks for (symlinks resolved: one copy, no dangling link).
        add(lib, "file", os.path.realpath(lib), 0o755)
    if not os.path.isfile(BUSYBOX):
        sys.exit(f"image: {BUSYBOX} is missing (apt-get install busybox-static)")
    add("bin/busybox", "file", BUSYBOX, 0o755)
    for a in APPLETS:
        add(f"bin/{a}", "link", "busybox", 0o777)
    if os.path.isfile(CA_BUNDLE):
        add(CA_BUNDLE, "file", os.path.realpath(CA_BUNDLE), 0o644)
    add("etc/passwd", "data", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", 0o644)
    add("etc/group", "data", b"root:x:0:\nnogroup:x:65534:\n", 0o644)
    add("tmp", "dir", None, 0o1777)
    add("root", "dir", None, 0o700)
    return sorted(out.items())


def layer_tar(tree):
    """The uncompressed layer: a deterministic tar of `tree`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for path, (kind, src, mode) in tree:
            info = tarfile.TarInfo(path)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = mode
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, src
                t.addfile(info)
            else:
                data = src if kind == "data" else open(src, "rb").read()
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_rootfs(tree, root):
    for path, (kind, src, mode) in tree:
        dst = os.path.join(root, path)
        if kind == "dir":
            os.makedirs(dst, exist_ok=True)
        elif kind == "link":
            if os.path.lexists(dst):
                os.remove(dst)
            os.symlink(src, dst)
            continue
        elif kind == "data":
            with open(dst, "wb") as f:
                f.write(src)
        else:
            shutil.copyfile(src, dst)
        os.chmod(dst, mode)


def blob(blobs, data):
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return f"sha256:{digest}", len(data)


def archive(tree, tag):
    layer = layer_tar(tree)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", mtime=0, compresslevel=9) as g:
        g.write(layer)
    blobs = {}
    layer_digest, layer_size = blob(blobs, gz.getvalue())
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": ARCH.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "config": {
            "User": "65534:65534",
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Entrypoint": ["/usr/local/bin/evioctl"],
            "Cmd": ["--help"],
            "Labels": {"org.opencontainers.image.title": "evio", "org.opencontainers.image.version": tag},
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "scripts/image.py"}],
    }
    config_digest, config_size = blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }
    manifest_digest, manifest_size = blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {
                "io.containerd.image.name": f"docker.io/library/evio:{tag}",
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }
    files = [("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
             ("index.json", json.dumps(index, sort_keys=True).encode())]
    files += [(f"blobs/sha256/{d}", data) for d, data in sorted(blobs.items())]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for d in ["blobs", "blobs/sha256"]:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            t.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue(), manifest_digest, layer_size


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", required=True, help="where evio-cni, eviod and evioctl are built")
    ap.add_argument("--tag", default="0.1.0")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="the OCI image archive to write")
    g.add_argument("--rootfs", help="write the image's tree into this directory instead")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="evio-image-") as tmp:
        tree = entries(a.bin_dir, tmp)
        if a.rootfs:
            write_rootfs(tree, a.rootfs)
            return
        data, digest, layer_size = archive(tree, a.tag)
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, a.out)
    print(f"{a.out}: evio:{a.tag} {digest}, {len(data)} bytes (layer {layer_size} bytes compressed)")


if __name__ == "__main__":
    main()
