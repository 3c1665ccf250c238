#!/usr/bin/env bash
# Smoke-test bezoar-jobs on a REAL cluster: what the loopback harness cannot run (images, a container
# runtime, the NVIDIA driver, TGI). Run it against a throwaway namespace of the cluster your kubeconfig
# points at, after `make images REGISTRY=...` pushed the images:
#
#   make smoke-cluster REGISTRY=ghcr.io/you/bezoar-jobs [SMOKE_NS=bezoar-smoke] [SMOKE_GPU=1] [SMOKE_TEACHER=1]
#
# 1. the chart's default install (the CPU demo) runs the whole recipe to its report (about 10-20 min
#    on a few CPU cores), under the restricted Pod Security profile of the namespace;
# 2. SMOKE_GPU=1: the train and eval images on a GPU node see CUDA, with the CUDA build they were
#    built for and the node's driver (bezoar_jobs/device_check.py, the same check every GPU stage runs);
# 3. SMOKE_TEACHER=1: the teacher image (our non-root TGI) starts its launcher and imports the server
#    as UID 10001 on a read-only root filesystem (no GPU needed for this part).
#
# Exit 0 only when every selected check passed. It deletes nothing but the namespace it created.
set -euo pipefail

REGISTRY="${REGISTRY:?set REGISTRY, e.g. ghcr.io/you/bezoar-jobs}"
VERSION="${VERSION:-0.1.0}"
NS="${SMOKE_NS:-bezoar-smoke}"
HELM="${HELM:-helm}"
KUBECTL="${KUBECTL:-kubectl}"
TIMEOUT="${SMOKE_TIMEOUT:-3600s}"
here="$(cd "$(dirname "$0")/.." && pwd)"

say() { printf '\n== %s\n' "$*"; }

say "namespace $NS (Pod Security: restricted, enforced)"
"$KUBECTL" create namespace "$NS" --dry-run=client -o yaml | "$KUBECTL" apply -f -
"$KUBECTL" label namespace "$NS" --overwrite pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest

say "1. helm install with no values but the registry: the CPU demo"
"$HELM" upgrade --install openbezoar "$here/helm/openbezoar" -n "$NS" --wait=false \
  --set clusterSettings.images.registry="$REGISTRY" --set clusterSettings.images.tag="$VERSION"
job="job/openbezoar-controller-openbezoar"
"$KUBECTL" -n "$NS" wait --for=condition=complete --timeout="$TIMEOUT" "$job" || {
  "$KUBECTL" -n "$NS" logs "$job" --tail=100 || true
  "$KUBECTL" -n "$NS" get jobs,pods -o wide || true
  exit 1
}
"$KUBECTL" -n "$NS" logs "$job" --tail=20
"$KUBECTL" -n "$NS" run bezoar-status --rm -i --restart=Never --image="$REGISTRY/bezoar-controller:$VERSION" \
  --overrides='{"spec":{"securityContext":{"runAsNonRoot":true,"runAsUser":10001,"seccompProfile":{"type":"RuntimeDefault"}},
  "containers":[{"name":"bezoar-status","image":"'"$REGISTRY/bezoar-controller:$VERSION"'","args":["status","--run","/runs/openbezoar"],
  "securityContext":{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]},"readOnlyRootFilesystem":true},
  "volumeMounts":[{"name":"runs","mountPath":"/runs"}]}],
  "volumes":[{"name":"runs","persistentVolumeClaim":{"claimName":"openbezoar-runs"}}]}}'

gpu_check() {  # $1 image: a pod given one GPU must see it with the image's CUDA build
  local image="$1" name="bezoar-gpu-$2"
  "$KUBECTL" -n "$NS" delete pod "$name" --ignore-not-found
  "$KUBECTL" -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 10001, runAsGroup: 10001, seccompProfile: {type: RuntimeDefault}}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  containers:
    - name: check
      image: $image
      command: [python, -c, "import torch; from bezoar_jobs.device_check import check, gather; check(); f = gather(); print('OK', f)"]
      env: [{name: BEZOAR_GPUS, value: "1"}, {name: HOME, value: /tmp}]
      resources: {limits: {nvidia.com/gpu: "1", memory: 8Gi}, requests: {cpu: "1", memory: 8Gi}}
      securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}, readOnlyRootFilesystem: true}
      volumeMounts: [{name: tmp, mountPath: /tmp}]
  volumes: [{name: tmp, emptyDir: {}}]
EOF
  "$KUBECTL" -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded --timeout=900s "pod/$name" || {
    "$KUBECTL" -n "$NS" logs "$name" || true; exit 1; }
  "$KUBECTL" -n "$NS" logs "$name"
}

if [ "${SMOKE_GPU:-0}" = 1 ]; then
  say "2. GPU images see CUDA on a GPU node (device_check)"
  gpu_check "$REGISTRY/bezoar-train:$VERSION" train
  gpu_check "$REGISTRY/bezoar-eval:$VERSION" eval
fi

if [ "${SMOKE_TEACHER:-0}" = 1 ]; then
  say "3. the teacher image starts as UID 10001 on a read-only root filesystem"
  "$KUBECTL" -n "$NS" delete pod bezoar-teacher-check --ignore-not-found
  "$KUBECTL" -n "$NS" apply -f - <<EOF
apiVersion: v1
kind: Pod
metadata: {name: bezoar-teacher-check}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 10001, runAsGroup: 10001, seccompProfile: {type: RuntimeDefault}}
  containers:
    - name: check
      image: $REGISTRY/bezoar-teacher:$VERSION
      command: [/bin/sh, -c, "text-generation-launcher --version && python -c 'import text_generation_server.cli; print(\"server imports\")'"]
      resources: {limits: {cpu: "1", memory: 4Gi}, requests: {cpu: "1", memory: 4Gi}}
      securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}, readOnlyRootFilesystem: true}
      volumeMounts: [{name: tmp, mountPath: /tmp}]
  volumes: [{name: tmp, emptyDir: {}}]
EOF
  "$KUBECTL" -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded --timeout=900s pod/bezoar-teacher-check || {
    "$KUBECTL" -n "$NS" logs bezoar-teacher-check || true; exit 1; }
  "$KUBECTL" -n "$NS" logs bezoar-teacher-check
fi

say "all selected checks passed; remove everything with: kubectl delete namespace $NS"
