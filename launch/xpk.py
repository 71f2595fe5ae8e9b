#!/usr/bin/env python3
"""`ualm train` on GKE TPU slices: render launch/xpk_jobset.yaml.tmpl and `kubectl apply` it,
or hand the same command to `xpk workload create` (which builds its own JobSet).

    python launch/xpk.py --name ualm-gen [--image REGISTRY/ualm-jax:TAG | --project P] \
        [--accelerator-type v5p-128] [--num-slices 2] [--submit kubectl|xpk --cluster C] \
        [--service-account KSA] [--pvc CLAIM:PATH] \
        --config configs/ualm_gen_1.5b.yaml --run-dir gs://BUCKET/runs/gen [key=value ...] \
        [--out FILE] [--dry-run]

The image must hold this repo installed (`pip install -r requirements.lock jax[tpu]` +
`pip install --no-deps -e .`): the Dockerfile at the repo root builds it, and without `--image`
the launcher names the image that file's build command tags, gcr.io/PROJECT/ualm-jax:latest
(PROJECT from `--project`). kubectl path: the manifest sets JAX_COORDINATOR_ADDRESS (pod 0 of
slice 0 through the JobSet headless service), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
`ualm train` passes to jax.distributed.initialize. xpk path: UALM_DISTRIBUTED=1, so jax reads
GKE's TPU_WORKER_ID / TPU_WORKER_HOSTNAMES / MEGASCALE_* itself. Several slices add
`mesh.dcn.data=N` unless the overrides set a `mesh.dcn.*` size.

Config: a path in the image (relative to its /app, the repo), or a `gs://` URL, which every pod's
`ualm train` reads from the bucket at start: copy a changed config there (`gcloud storage cp`)
and launch again, no image rebuild. Before anything is printed or run, launch/preflight.py loads
the config as the pods will (an image path from this checkout, which the image is built from; a
gs:// one from the bucket, with your credentials) with the overrides, and checks the mesh
against the slices' devices, train.batch_size against their hosts, the run dir, and the data
paths (on gs://, on a --pvc volume, or in the image: present here and not left out by
.dockerignore; `--skip-path-check` skips the last). A problem is one line on stderr and exit
status 2.

Run directory: the hosts of a multi-host job share no file system, so `--run-dir` is a
`gs://` URL (passed through unchanged; no volume is mounted for it), or a path under a shared
volume mounted with `--pvc CLAIM:PATH` (a ReadWriteMany PersistentVolumeClaim, e.g. Filestore).
A local path without such a mount is refused. Credentials for gs://: pods on the host network
(the default, for DCN bandwidth) get the node pool's service account from GKE; with
`--service-account KSA` the pods run as that Kubernetes service account on the pod network and
get its Workload Identity (GKE does not give host-network pods Workload Identity).

Values reach the manifest as quoted YAML scalars and the pod's shell as shell-quoted words (a `$`
in them is doubled so Kubernetes expands nothing); values with control characters (newline,
CR, ...) are refused.

`--dry-run` prints the manifest between `# file: PATH` and `# end of file`, then the command.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import posixpath
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or via runpy
import preflight  # noqa: E402
from shellsafe import reject_control_chars  # noqa: E402
from templating import render  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROG = "launch/xpk.py"
TEMPLATE = Path(__file__).resolve().parent / "xpk_jobset.yaml.tmpl"
IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR: the repo inside the image
# TPU generation -> GKE accelerator label (chips, hosts, grid: preflight.tpu_slice)
GKE_LABELS = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice",
              "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
MEGASCALE_PORT = 8080
EPILOG = ("Data must be on a bucket (gs://), on a --pvc volume or baked into the image. The "
          "config, mesh, batch size, run dir and data paths are checked before any kubectl or "
          "xpk command (one line and exit status 2 on a problem).")
# The image the Dockerfile's build command tags (see its header) and --image's default.
IMAGE_NAME, IMAGE_TAG = "ualm-jax", "latest"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def default_image(project: str) -> str:
    return f"gcr.io/{project}/{IMAGE_NAME}:{IMAGE_TAG}"


def parse_pvcs(specs: list[str]) -> list[tuple[str, str]]:
    """`CLAIM:PATH` -> (claim, normalized absolute mount path)."""
    out = []
    for spec in specs:
        claim, sep, path = spec.partition(":")
        if not sep or not DNS_LABEL.fullmatch(claim) or not path.startswith("/"):
            raise SystemExit(f"--pvc {spec!r}: expected CLAIM:/ABSOLUTE/PATH (CLAIM a "
                             "PersistentVolumeClaim name)")
        out.append((claim, posixpath.normpath(path)))
    return out


def on_this_machine(path: str) -> str:
    """A path under the image's /app -> the same path relative to this checkout (which the
    image is built from, and where the checks look); any other path as it is."""
    if path == IMAGE_ROOT or path.startswith(IMAGE_ROOT + "/"):
        return path[len(IMAGE_ROOT):].lstrip("/") or "."
    return path


def dockerignored(rel: str) -> str | None:
    """The .dockerignore pattern that keeps `rel` (relative to the repo) or a folder above it
    out of the image; None if none does (`!` exceptions are not read)."""
    ignore = REPO / ".dockerignore"
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    patterns = [x.strip().strip("/") for x in lines
                if x.strip() and not x.lstrip().startswith(("#", "!"))]
    parts = posixpath.normpath(rel).split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for pat in patterns:
            bare = pat[3:] if pat.startswith("**/") else pat  # `**/x` matches x at the top too
            if fnmatch.fnmatch(prefix, pat) or fnmatch.fnmatch(prefix, bare):
                return pat
    return None


def not_in_image(path: str) -> str | None:
    """Why a local path (relative to /app, or absolute) is not in the image; None if it is."""
    rel = posixpath.normpath(on_this_machine(path))
    if rel.startswith("/") or rel == ".." or rel.startswith("../"):
        return f"is not in the image (only the repo is, at {IMAGE_ROOT})"
    pat = dockerignored(rel)
    return f"is left out of the image by .dockerignore ({pat})" if pat else None


def data_in_image(path: str) -> str | None:
    why = not_in_image(path)
    return f"{why}: put the data on gs:// or on a --pvc volume" if why else None


def check(args) -> None:
    """launch/preflight.py's checks for these slices, the image and the --pvc volumes."""
    slice_shape(args.accelerator_type, args.topology)
    mounts = tuple(m for _, m in parse_pvcs(args.pvc))
    why = None if "://" in args.config else not_in_image(args.config)
    if why:
        raise preflight.PreflightError(f"--config {args.config} {why}: use a gs:// config (the "
                                       "pods read it at start) or one under configs/")
    target = preflight.tpu_target(
        args.accelerator_type, args.num_slices, REPO, mounts=mounts, reaches=data_in_image,
        localize=on_this_machine, check_paths=not args.skip_path_check,
        run_dir_hint="use a gs:// run dir (or mount a shared volume over it with --pvc CLAIM:PATH)")
    preflight.check(target, on_this_machine(args.config), train_overrides(args), args.run_dir)


def yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar


def block(lines: list[str]) -> str:
    return "\n".join(lines)


def slice_shape(accelerator: str, topology: str | None) -> dict:
    """v5p-128 -> GKE label, topology 4x4x4, 64 chips, 16 hosts of 4 chips."""
    s = preflight.tpu_slice(accelerator)
    chips = s["chips"]
    topology = topology or "x".join(map(str, s["grid"]))
    return {"gke_accelerator": GKE_LABELS[s["generation"]], "topology": topology,
            "chips": chips, "chips_per_host": s["chips_per_host"], "hosts_per_slice": s["hosts"]}


def train_overrides(args) -> list[str]:
    over = list(args.overrides)
    if args.num_slices > 1 and not any(o.startswith("mesh.dcn.") for o in over):
        over.append(f"mesh.dcn.data={args.num_slices}")
    return over


def train_cmd(args) -> str:
    return shlex.join([args.ualm, "train", "--config", args.config, "--run-dir", args.run_dir,
                       *train_overrides(args)])


def pod_settings(args) -> str:
    if args.service_account:  # Workload Identity: only off the host network
        return block([f"serviceAccountName: {yaml_str(args.service_account)}",
                      "hostNetwork: false  # GKE gives host-network pods no Workload Identity"])
    return block(["hostNetwork: true  # DCN traffic without the pod network's overhead",
                  "dnsPolicy: ClusterFirstWithHostNet"])


def volumes(args) -> tuple[str, str]:
    """(the container's volumeMounts, the pod's volumes) for --pvc; empty without."""
    pvcs = parse_pvcs(args.pvc)
    if not pvcs:
        return "", ""
    mounts = ["volumeMounts:"] + [f"- name: run-volume-{i}\n  mountPath: {yaml_str(path)}"
                                  for i, (_, path) in enumerate(pvcs)]
    vols = ["volumes:"] + [f"- name: run-volume-{i}\n  persistentVolumeClaim:\n"
                           f"    claimName: {yaml_str(claim)}" for i, (claim, _) in enumerate(pvcs)]
    return block(mounts), block(vols)


def megascale_env(num_slices: int) -> str:
    if num_slices == 1:
        return ""
    env = {"MEGASCALE_COORDINATOR_ADDRESS": "$(JOBSET_NAME)-$(REPLICATED_JOB_NAME)-0-0.$(JOBSET_NAME)",
           "MEGASCALE_NUM_SLICES": str(num_slices), "MEGASCALE_SLICE_ID": "$(SLICE_ID)",
           "MEGASCALE_PORT": str(MEGASCALE_PORT)}
    return "\n".join(f"- name: {k}\n  value: {json.dumps(v)}" for k, v in env.items())


def manifest(args) -> str:
    shape = slice_shape(args.accelerator_type, args.topology)
    hosts = shape["hosts_per_slice"]
    # `$$` reaches the shell as `$` (Kubernetes expands `$(VAR)` in args), so every `$` of the
    # user's values is doubled: the shell gets them exactly as given.
    script = (f"export JAX_PROCESS_ID=$$((SLICE_ID * {hosts} + JOB_COMPLETION_INDEX)) && "
              f"exec {train_cmd(args).replace('$', '$$')}")
    volume_mounts, pod_volumes = volumes(args)
    values = {**shape, "name": yaml_str(args.name), "image": yaml_str(args.image),
              "gke_accelerator": yaml_str(shape["gke_accelerator"]),
              "topology": yaml_str(shape["topology"]), "num_slices": args.num_slices,
              "num_processes": args.num_slices * hosts, "max_restarts": args.max_restarts,
              "coordinator_port": args.coordinator_port, "megascale_env": megascale_env(args.num_slices),
              "pod_settings": pod_settings(args), "volume_mounts": volume_mounts,
              "volumes": pod_volumes, "script": yaml_str(script)}
    return render(TEMPLATE.read_text(), values)


def xpk_cmd(args) -> list[str]:
    cmd = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.name}",
           f"--tpu-type={args.accelerator_type}", f"--num-slices={args.num_slices}",
           f"--docker-image={args.image}", f"--max-restarts={args.max_restarts}",
           f"--command=UALM_DISTRIBUTED=1 {train_cmd(args)}"]
    cmd += [f"--project={args.project}"] if args.project else []
    cmd += [f"--zone={args.zone}"] if args.zone else []
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG)
    p.add_argument("--name", required=True, help="JobSet / workload name (DNS label)")
    p.add_argument("--image", default=None,
                   help="container image with the repo installed (default, with --project: "
                        f"{default_image('PROJECT')}, which the Dockerfile builds)")
    p.add_argument("--accelerator-type", default="v5p-128", help="e.g. v5p-128, v5litepod-16")
    p.add_argument("--topology", default=None, help="override the slice topology, e.g. 4x4x4")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--coordinator-port", type=int, default=8476)
    p.add_argument("--ualm", default="ualm", help="the ualm executable inside the image")
    p.add_argument("--submit", choices=["kubectl", "xpk"], default="kubectl")
    p.add_argument("--cluster", default=None, help="GKE cluster (xpk)")
    p.add_argument("--project", default=None, help="(xpk; and the default --image's registry)")
    p.add_argument("--zone", default=None, help="(xpk)")
    p.add_argument("--service-account", default=None, metavar="KSA",
                   help="(kubectl) run the pods as this Kubernetes service account, on the pod "
                        "network, so gs:// access uses its Workload Identity")
    p.add_argument("--pvc", action="append", default=[], metavar="CLAIM:PATH",
                   help="(kubectl) mount this PersistentVolumeClaim at PATH in every pod; a "
                        "local --run-dir of a multi-host job must lie under one (repeatable)")
    p.add_argument("--out", default=None, help="manifest path (default: NAME.jobset.yaml)")
    p.add_argument("--config", required=True,
                   help="config path inside the image (relative to /app, the repo), or a gs:// "
                        "URL the pods read at start (a change needs no image rebuild)")
    p.add_argument("--run-dir", required=True, help="shared run directory, e.g. gs://bucket/run")
    p.add_argument("--skip-path-check", action="store_true",
                   help="do not look for the config's data paths here (they exist only in a "
                        "custom image or on the cluster)")
    p.add_argument("--dry-run", action="store_true",
                   help="check, print manifest and command, run nothing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.num_slices < 1:
        p.error("--num-slices must be >= 1")
    reject_control_chars(args)
    if args.image is None:
        if not args.project:
            raise SystemExit("--image missing: pass --image, or --project for the default "
                             f"{default_image('PROJECT')}")
        args.image = default_image(args.project)
    parse_pvcs(args.pvc)
    if args.submit == "xpk":
        if not args.cluster:
            p.error("--submit xpk needs --cluster")
        if args.pvc or args.service_account:
            raise SystemExit("--pvc and --service-account are for --submit kubectl (xpk builds "
                             "its own JobSet)")
    with preflight.refusals(PROG):
        check(args)
    if args.submit == "xpk":
        cmd = xpk_cmd(args)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return subprocess.run(cmd).returncode
    out = args.out or f"{args.name}.jobset.yaml"
    text = manifest(args)
    cmd = ["kubectl", "apply", "-f", out]
    if args.dry_run:
        print(f"# file: {out}\n{text}# end of file\n{shlex.join(cmd)}")
        return 0
    Path(out).write_text(text)
    print(f"wrote {out}", flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
